"""Structured output: decoding held to a JSON schema, any JSON object, or a regular expression (llguidance).

Each constrained request gets a `Constraint`: before every token, the tokens its grammar allows next (a mask the
engine applies to that request's logits), and after it, the token taken. llguidance computes masks from the
vocabulary's bytes in Rust (no Python loop over the vocabulary) and needs no other dependency; xgrammar, the
other candidate, pulls in triton and transformers (docs/benchmarks.md has the cost per token). When the grammar is
complete only EOS is allowed, so the answer ends there.

The vocabulary is handed to llguidance once per tokenizer (`grammar_tokenizer`): every token's bytes, with BOS,
EOS and UNK marked special (llguidance's 0xff prefix), so no grammar can produce them as text.
"""

from __future__ import annotations

from functools import cache

import torch

from llamaforge.errors import GenerationError
from llamaforge.tokenizer import Tokenizer

SPECIAL_PIECES = ("<unk>", "<s>", "</s>")  # SentencePiece's control and unknown pieces in Llama 2's vocabulary


class GrammarError(GenerationError):
    """A schema or pattern that cannot be compiled into a grammar."""


def _llguidance():
    try:
        import llguidance
    except ImportError as exc:
        raise GrammarError("structured output needs llguidance: pip install 'llamaforge[serve]'") from exc
    return llguidance


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: every token's bytes, EOS and BOS, and a way to tokenize text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        pieces = [tokenizer.id_to_piece(t) for t in range(tokenizer.vocab_size)]
        special = {tokenizer.bos_id, tokenizer.eos_id} | {t for t, p in enumerate(pieces) if p in SPECIAL_PIECES}
        self.special_token_ids = sorted(special)
        self.tokens = [b"\xff" + pieces[t].encode() if t in special else tokenizer.token_bytes(t)
                       for t in range(tokenizer.vocab_size)]
        self._tokenizer = tokenizer
        self._newline = tokenizer.encode("\n", bos=False)

    def __call__(self, text: str | bytes) -> list[int]:
        """Tokens of text in the middle of an answer. SentencePiece starts a text with a word-start space; behind a
        newline (a byte token that merges with nothing) it does not, and the newline's tokens are dropped again."""
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        ids = self._tokenizer.encode("\n" + text, bos=False)
        if ids[:len(self._newline)] != self._newline:
            return self._tokenizer.encode(text, bos=False)
        return ids[len(self._newline):]


@cache
def grammar_tokenizer(tokenizer: Tokenizer):
    """The llguidance tokenizer of a llamaforge one (built once: about a second for a 32k vocabulary)."""
    llguidance = _llguidance()
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer)))


def json_schema_grammar(schema: dict | None) -> str:
    """A grammar for JSON matching `schema` (None: any JSON object, OpenAI's json_object mode)."""
    llguidance = _llguidance()
    try:
        # Separators fixed (", " and ": "): a model cannot loop on whitespace between tokens.
        return llguidance.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                             defaults={"whitespace_flexible": False})
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"the JSON schema cannot be used: {exc}") from None


def regex_grammar(pattern: str) -> str:
    """A grammar for text matching the regular expression `pattern`."""
    return _llguidance().LLMatcher.grammar_from_regex(pattern)


class Constraint:
    """One request's grammar state: which tokens may come next; the tokens taken so far move it on."""

    def __init__(self, tokenizer: Tokenizer, grammar: str, source: str = "grammar") -> None:
        """`source` names where the grammar came from (a request field) in the error of one that cannot compile."""
        llguidance = _llguidance()
        self.matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer), grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"{source}: the grammar cannot be compiled: {self.matcher.get_error()}")
        self.vocab_size = tokenizer.vocab_size
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens the grammar allows next."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)  # (ceil(V / 32),)
        return ((words[:, None] >> self._bits) & 1).bool().flatten()[:self.vocab_size]

    def accept(self, token_id: int) -> None:
        """Move on by the token taken; GrammarError if the grammar did not allow it."""
        if not self.matcher.consume_token(token_id):
            raise GrammarError(f"token {token_id} does not fit the grammar: {self.matcher.get_error()}")


def constrain(logits: torch.Tensor, constraint: Constraint) -> torch.Tensor:
    """A copy of one row's logits (V,) with the tokens the grammar forbids at -inf."""
    return logits.masked_fill(~constraint.allowed().to(logits.device), float("-inf"))

