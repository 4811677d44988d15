"""The Llama 2 chat format, built from token ids exactly as Meta's `Llama.chat_completion` builds it.

Reference: meta-llama/llama `llama/generation.py`. Each finished user/assistant exchange is
`[BOS] + encode("[INST] {user} [/INST] {answer} ") + [EOS]`; the last user turn is
`[BOS] + encode("[INST] {user} [/INST]")`; a leading system message is folded into the first user
message between `<<SYS>>` tags. Unlike the reference, which generates and then hides the answer, a
dialog with control tags in its content is refused before anything runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from llamaforge.errors import ChatFormatError

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
BOS_TEXT, EOS_TEXT = "<s>", "</s>"
# The same format as a Jinja chat template (HF's `chat_template`, GGUF's `tokenizer.chat_template`), for
# tools that format dialogs themselves: llama.cpp's server reads it from an exported GGUF.
JINJA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


class Encoder(Protocol):
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...


@dataclass(frozen=True)
class Segment:
    """One piece of the prompt: text encoded on its own, with BOS before and maybe EOS after.

    `answer_start` is where the assistant's part of `text` begins (the space after "[/INST]"), for
    training's loss mask; None for the final, unanswered user turn.
    """

    text: str
    eos: bool
    answer_start: int | None = None


def validate_dialog(messages: Sequence[dict], answered: bool = False) -> None:
    """Raise ChatFormatError naming the first message that breaks Llama 2's rules.

    A prompt ends with a user turn for the model to answer; a training example (`answered`) ends
    with the assistant's answer.
    """
    if not messages:
        raise ChatFormatError("the dialog is empty; send at least one user message")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ChatFormatError(f"message {index} must be an object with 'role' and 'content'")
        if not isinstance(message["content"], str):
            raise ChatFormatError(f"message {index} ({message['role']}): content must be a string")
        for tag in SPECIAL_TAGS:
            if tag in message["content"]:
                raise ChatFormatError(
                    f"message {index} ({message['role']}) contains the control tag {tag!r}; "
                    "the chat format reserves it, so remove it from the text"
                )
    start = 1 if messages[0]["role"] == "system" else 0
    for index in range(start, len(messages)):
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        role = messages[index]["role"]
        if role != expected:
            raise ChatFormatError(
                f"message {index} has role {role!r} where {expected!r} was expected; a dialog is an "
                "optional system message, then user and assistant turns alternating"
            )
    last = "assistant" if answered else "user"
    if len(messages) == start or messages[-1]["role"] != last:
        why = "a training example ends with the answer" if answered else "the model answers a user turn"
        raise ChatFormatError(f"the last message (index {len(messages) - 1}) must have role {last!r}: {why}")


def dialog_segments(messages: Sequence[dict], answered: bool = False) -> list[Segment]:
    """Split a validated dialog into the segments Meta encodes one by one."""
    validate_dialog(messages, answered)
    turns = [dict(m) for m in messages]
    if turns[0]["role"] == "system":
        # Meta keeps the system text as is and strips only the combined user content below.
        system = turns.pop(0)["content"]
        turns[0]["content"] = B_SYS + system + E_SYS + turns[0]["content"]
    segments = []
    for user, answer in zip(turns[::2], turns[1::2], strict=False):
        question = f"{B_INST} {user['content'].strip()} {E_INST}"
        segments.append(Segment(f"{question} {answer['content'].strip()} ", eos=True, answer_start=len(question)))
    if not answered:
        segments.append(Segment(f"{B_INST} {turns[-1]['content'].strip()} {E_INST}", eos=False))
    return segments


def encode_dialog(tokenizer: Encoder, messages: Sequence[dict]) -> list[int]:
    """Token ids of the dialog in Llama 2's chat format, ready for the model to answer."""
    ids: list[int] = []
    for segment in dialog_segments(messages):
        ids += tokenizer.encode(segment.text, bos=True, eos=segment.eos)
    return ids


def render_dialog(messages: Sequence[dict]) -> str:
    """The prompt as text for display, with BOS/EOS shown as `<s>` / `</s>`."""
    return "".join(
        BOS_TEXT + segment.text + (EOS_TEXT if segment.eos else "") for segment in dialog_segments(messages)
    )
