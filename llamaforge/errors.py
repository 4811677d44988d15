"""The exceptions llamaforge raises for bad input: each message names the thing and the fix."""


class LlamaforgeError(Exception):
    """Base class of every error a user can cause and fix."""


class CheckpointError(LlamaforgeError):
    """A model path, file or hub repo that cannot be loaded."""


class TokenizerError(LlamaforgeError):
    """A tokenizer that is missing, unreadable or does not match the model."""


class ChatFormatError(LlamaforgeError):
    """A dialog that does not follow the Llama 2 chat rules."""


class GenerationError(LlamaforgeError):
    """Generation requests that cannot run: prompt too long, invalid sampling values."""
