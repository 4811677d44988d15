"""Perplexity and bits per byte of a text with a sliding window, as HF's perplexity guide computes it.

Reference: "Perplexity of fixed-length models" in the transformers docs. The text is encoded once (with
BOS); windows of `context` tokens start every `stride` tokens, and each window scores only the tokens
no earlier window scored, so every token after the first is scored exactly once, with at least
`context - stride` tokens before it. Perplexity is exp of the mean negative log-likelihood over those
tokens (token-weighted: a short last window counts for its tokens only); bits per byte divides the
summed negative log-likelihood in bits by the text's UTF-8 bytes, which makes it comparable across
tokenizers.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from llamaforge.api import LLM
from llamaforge.errors import LlamaforgeError
from llamaforge.eval.scoring import batch_size_named_on_oom
from llamaforge.generate import pad_rows


@dataclass
class PerplexityResult:
    """Scores of one text, and how they were measured."""

    perplexity: float
    bits_per_byte: float
    nll: float  # summed negative log-likelihood in nats
    tokens: int  # tokens scored
    bytes: int
    context: int
    stride: int
    windows: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over `n_tokens` tokens."""
    spans = []
    scored_until = 1  # token 0 (BOS) has nothing before it to be predicted from
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        spans.append((begin, end, scored_until))
        scored_until = end
        if end == n_tokens:
            break
    return spans


def perplexity(llm: LLM, text: str, context: int | None = None, stride: int | None = None, batch_size: int = 1,
               progress: bool = True) -> PerplexityResult:
    """Perplexity and bits per byte of `text` under the model, windows of `context` tokens every `stride`."""
    context = context or llm.config.context_length
    stride = stride or max(1, context // 2)
    if not 2 <= context <= llm.config.context_length:
        raise LlamaforgeError(f"--context must be between 2 and the model's context of {llm.config.context_length}, "
                              f"got {context}")
    if not 1 <= stride < context:
        raise LlamaforgeError(f"--stride must be at least 1 and less than --context ({context}) so that every token "
                              f"is scored, got {stride}")
    if llm.tokenizer is None:
        raise LlamaforgeError("perplexity reads text, and the model was loaded without a tokenizer; pass --tokenizer")
    if not text:
        raise LlamaforgeError("the text is empty; perplexity needs at least one token")
    started = time.perf_counter()
    ids = llm.tokenizer.encode(text, bos=True)
    spans = windows(len(ids), context, stride)
    nll = 0.0
    with torch.inference_mode(), batch_size_named_on_oom(llm.device, batch_size, "windows"):
        for start in tqdm(range(0, len(spans), batch_size), desc="perplexity", unit="batch", disable=not progress,
                          dynamic_ncols=True):
            nll += _window_nll(llm, ids, spans[start:start + batch_size])
    n_bytes = len(text.encode("utf-8"))
    scored = len(ids) - 1
    return PerplexityResult(perplexity=math.exp(nll / scored),
                            bits_per_byte=nll / math.log(2) / n_bytes, nll=nll, tokens=scored, bytes=n_bytes,
                            context=context, stride=stride, windows=len(spans), seconds=time.perf_counter() - started)


def _window_nll(llm: LLM, ids: list[int], spans: list[tuple[int, int, int]]) -> float:
    """Summed negative log-likelihood of the tokens these windows score, in one forward pass."""
    device = llm.device
    tokens = pad_rows([ids[begin:end] for begin, end, _ in spans], device)  # (B, T)
    # scored[b, t]: the logits at t predict token t + 1, which this window scores.
    scored = torch.zeros(tokens.shape, dtype=torch.bool, device=device)
    targets = []
    for row, (begin, end, first) in enumerate(spans):
        scored[row, first - 1 - begin:end - 1 - begin] = True
        targets.extend(ids[first:end])
    return llm.model(tokens, logits_at=scored, targets=torch.tensor(targets, device=device)).item()
