"""Log-likelihoods and greedy generations of evaluation requests, as lm-evaluation-harness's HF backend
computes them, in fewer forward passes.

References: lm-eval's `TemplateLM._encode_pair` (how a context and its continuation are split into
tokens), `HFLM._loglikelihood_tokens` (left truncation, which logits score the continuation) and
`HFLM.generate_until` (context room, stop sequences).

The requests of one document share a prefix: the few-shot examples and the question, for Winogrande
everything up to where its options differ. That prefix runs once per document; its KV cache is copied
to one row per request, and only each request's own tokens run after it. lm-eval instead runs every
(context + continuation) in full, so a 4-choice, 25-shot ARC question costs it about four times the
compute. Requests are sorted by length (longest first) and batched, `batch_size` requests per forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llamaforge.api import LLM
from llamaforge.errors import LlamaforgeError
from llamaforge.model import KVCache, Llama
from llamaforge.sampling import SamplingParams
from llamaforge.tokenizer import Tokenizer


@dataclass
class Scored:
    """One request as ids: the model reads `tokens`, and its predictions at the last len(targets) positions
    are scored against `targets` (the continuation)."""

    tokens: list[int]
    targets: list[int]

    @property
    def first_scored(self) -> int:
        """The position whose logits predict the first continuation token."""
        return len(self.tokens) - len(self.targets)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids, split as lm-eval's HF backend splits them.

    Trailing whitespace moves from the context to the continuation (so " Paris" stays one word); the
    context gets BOS; the continuation's ids are what encoding context + continuation adds after the
    context's own ids, not the continuation encoded alone (the two can differ where they meet).
    """
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = tokenizer.encode(stripped, bos=True)
    whole = tokenizer.encode(stripped + continuation, bos=True)
    return context_ids, whole[len(context_ids):]


def tokenize_request(tokenizer: Tokenizer, context: str, continuation: str, max_len: int) -> Scored:
    """A (context, continuation) request as ids, cut from the left to `max_len` input tokens like lm-eval."""
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    if not continuation_ids:
        raise LlamaforgeError(f"the continuation {continuation!r} adds no tokens to its context; it cannot be scored")
    if len(continuation_ids) > max_len:
        raise LlamaforgeError(f"a continuation of {len(continuation_ids)} tokens is longer than the model's "
                              f"context of {max_len}")
    # The last token is only ever a target, never an input.
    full = (context_ids + continuation_ids)[-(max_len + 1):]
    return Scored(full[:-1], continuation_ids)


@dataclass
class _Unit:
    """Requests that run one shared prefix: `prefix` tokens every one of them starts with."""

    group: int
    members: list[int]  # indices into the group's requests
    requests: list[Scored]
    prefix: int

    @property
    def longest(self) -> int:
        return max(len(r.tokens) for r in self.requests)


def shared_prefix(requests: Sequence[Scored]) -> int:
    """How many leading tokens all requests share, at most up to the first scored position of each.

    A request's first target is predicted at `first_scored`; the prefix pass yields the logits of its
    last token, so the prefix may end there but not later.
    """
    limit = min(r.first_scored + 1 for r in requests)
    first = requests[0].tokens
    length = 0
    while length < limit and all(r.tokens[length] == first[length] for r in requests):
        length += 1
    return length


def _units(groups: Sequence[Sequence[Scored]]) -> list[_Unit]:
    units = []
    for g, requests in enumerate(groups):
        length = shared_prefix(requests)
        if length:
            units.append(_Unit(g, list(range(len(requests))), list(requests), length))
        else:  # left truncation cut the requests differently: nothing is shared, each runs on its own
            units.extend(_Unit(g, [i], [r], r.first_scored + 1) for i, r in enumerate(requests))
    return units


def loglikelihoods(model: Llama, groups: Sequence[Sequence[Scored]], batch_size: int,
                   progress: bool = True) -> list[list[float]]:
    """Each request's summed log-probability of its targets, in the groups' shape.

    A group is the requests of one document; whatever prefix its requests share runs once.
    """
    units = sorted(_units(groups), key=lambda u: -u.longest)
    results = [[0.0] * len(requests) for requests in groups]
    with tqdm(total=sum(len(g) for g in groups), desc="loglikelihood", unit="req", disable=not progress,
              dynamic_ncols=True) as bar:
        batch: list[_Unit] = []
        size = 0  # requests in the batch
        for unit in units:
            if batch and size + len(unit.requests) > batch_size:
                _score_batch(model, batch, batch_size, results)
                bar.update(size)
                batch, size = [], 0
            batch.append(unit)
            size += len(unit.requests)
        if batch:
            _score_batch(model, batch, batch_size, results)
            bar.update(size)
    return results


def _pad(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Rows of ids right-padded into one (B, T) tensor, built on the host and copied once."""
    tokens = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return tokens.to(device)


class _Rest(NamedTuple):
    """A request with tokens after its unit's prefix: where its prefix sits in the batch, and where it belongs."""

    row: int  # the unit's row in the prefix batch (and its cache)
    unit: _Unit
    member: int
    request: Scored


@torch.inference_mode()
def _score_batch(model: Llama, units: list[_Unit], batch_size: int, results: list[list[float]]) -> None:
    device = model.lm_head.weight.device
    # Each unit's requests continue after its prefix; the cache holds the longest prefix plus the longest rest.
    rest = max(len(r.tokens) - u.prefix for u in units for r in u.requests)
    cache = model.new_kv_cache(len(units), max(u.prefix for u in units) + rest)
    prefixes = _pad([u.requests[0].tokens[:u.prefix] for u in units], device)  # (G, P)
    input_pos = torch.arange(prefixes.shape[1], device=device).expand_as(prefixes)
    last = torch.tensor([u.prefix - 1 for u in units], device=device)
    prefix_logprobs = F.log_softmax(model(prefixes, input_pos, cache, logits_at=last).float(), dim=-1)  # (G, V)

    # A request whose first target follows the prefix's last token takes that one log-prob from the prefix pass.
    from_prefix = [(row, unit, member, request.targets[0]) for row, unit in enumerate(units)
                   for member, request in zip(unit.members, unit.requests, strict=True)
                   if request.first_scored == unit.prefix - 1]
    if from_prefix:
        rows = torch.tensor([row for row, *_ in from_prefix], device=device)
        targets = torch.tensor([target for *_, target in from_prefix], device=device)
        for (_, unit, member, _), value in zip(from_prefix, prefix_logprobs[rows, targets].tolist(), strict=True):
            results[unit.group][member] += value
    rests = [_Rest(row, unit, member, request) for row, unit in enumerate(units)
             for member, request in zip(unit.members, unit.requests, strict=True) if len(request.tokens) > unit.prefix]
    for start in range(0, len(rests), batch_size):
        _score_rest(model, cache, rests[start:start + batch_size], results)


def _score_rest(model: Llama, cache: list[KVCache], rests: list[_Rest], results: list[list[float]]) -> None:
    """Run each request's tokens after its prefix on a copy of the prefix's cache; add its scored log-probs."""
    device = model.lm_head.weight.device
    rows = torch.tensor([r.row for r in rests], device=device)
    copies = [KVCache(layer.k.index_select(0, rows), layer.v.index_select(0, rows)) for layer in cache]
    tokens = _pad([r.request.tokens[r.unit.prefix:] for r in rests], device)  # (N, S)
    starts = torch.tensor([r.unit.prefix for r in rests], device=device)
    input_pos = starts[:, None] + torch.arange(tokens.shape[1], device=device)  # (N, S)
    # Positions from each request's first scored one (or the prefix's end) to its last token predict targets.
    first = torch.tensor([max(r.request.first_scored, r.unit.prefix) for r in rests], device=device)
    end = torch.tensor([len(r.request.tokens) for r in rests], device=device)
    scored = (input_pos >= first[:, None]) & (input_pos < end[:, None])  # (N, S)
    logprobs = F.log_softmax(model(tokens, input_pos, copies, logits_at=scored).float(), dim=-1)  # (M, V)
    # A request's first target was scored by the prefix pass when its first scored position is the prefix's last.
    skip = [int(r.request.first_scored < r.unit.prefix) for r in rests]
    targets = torch.tensor([t for r, n in zip(rests, skip, strict=True) for t in r.request.targets[n:]], device=device)
    picked = logprobs.gather(1, targets[:, None])[:, 0].tolist()  # (M,), row by row as the mask orders them
    position = 0
    for r, count in zip(rests, scored.sum(dim=1).tolist(), strict=True):
        results[r.unit.group][r.member] += sum(picked[position:position + count])
        position += count


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop sequence."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


def generate_until(llm: LLM, prompts: Sequence[str], stops: Sequence[str], max_new_tokens: int, batch_size: int,
                   progress: bool = True) -> list[str]:
    """Greedy continuations of the prompts, cut at the first stop sequence, as lm-eval's generate_until.

    A prompt longer than the context minus `max_new_tokens` loses its oldest tokens (BOS first), as in lm-eval.
    The text is `decode(new tokens)`, so it has no leading space, like lm-eval's.
    """
    tokenizer = llm.tokenizer
    room = llm.config.context_length - max_new_tokens
    if room < 1:
        raise LlamaforgeError(f"the task generates up to {max_new_tokens} tokens, which leaves no room for a prompt "
                              f"in the model's context of {llm.config.context_length}")
    encoded = [tokenizer.encode(prompt, bos=True)[-room:] for prompt in prompts]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=tuple(stops))
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), prompts[i]))
    texts = [""] * len(prompts)
    with tqdm(total=len(prompts), desc="generate", unit="req", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for index, result in zip(chunk, llm.generate([encoded[i] for i in chunk], params=params), strict=True):
                texts[index] = cut_at_stops(tokenizer.decode(result.token_ids), stops)
            bar.update(len(chunk))
    return texts
