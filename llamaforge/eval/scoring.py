"""Log-likelihoods and greedy generations of evaluation requests, as lm-evaluation-harness's HF backend
computes them, in fewer forward passes.

References: lm-eval's `TemplateLM._encode_pair` (how a context and its continuation are split into
tokens), `HFLM._loglikelihood_tokens` (left truncation, which logits score the continuation) and
`HFLM.generate_until` (context room, stop sequences).

The requests of one document share a prefix: the few-shot examples and the question, for Winogrande
everything up to where its options differ. That prefix runs once per document; its KV cache is copied
to one row per request, and only each request's own tokens run after it. lm-eval instead runs every
(context + continuation) in full, so a 4-choice, 25-shot ARC question costs it about four times the
compute. Documents can share a prefix too: every MMLU question of a subject follows the same five
examples, every TruthfulQA question the same preamble. Documents that share at least `MIN_SHARED`
tokens are batched together, and the part a whole batch shares (its root) runs once for the batch.
Batches hold `batch_size` documents (one prefix row each), longest first; their requests' own tokens
run `batch_size` rows at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from llamaforge.api import LLM
from llamaforge.errors import LlamaforgeError
from llamaforge.generate import pad_rows
from llamaforge.model import KVCache, Llama
from llamaforge.progress import ProgressBar
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


# Documents sharing at least this many leading tokens are batched together so that the shared part runs
# once; below it a separate pass costs more than it saves.
MIN_SHARED = 32


@dataclass
class _Unit:
    """Requests that run one shared prefix: `prefix` tokens every one of them starts with."""

    group: int
    members: list[int]  # indices into the group's requests
    requests: list[Scored]
    prefix: int

    @property
    def prefix_tokens(self) -> list[int]:
        return self.requests[0].tokens[:self.prefix]

    @property
    def longest(self) -> int:
        return max(len(r.tokens) for r in self.requests)


def common_length(sequences: Sequence[Sequence[int]], limit: int) -> int:
    """How many leading tokens all sequences share, at most `limit`."""
    first = sequences[0]
    limit = min(limit, *(len(s) for s in sequences))
    length = 0
    while length < limit and all(s[length] == first[length] for s in sequences):
        length += 1
    return length


def shared_prefix(requests: Sequence[Scored]) -> int:
    """How many leading tokens all requests share, at most up to the first scored position of each.

    A request's first target is predicted at `first_scored`; the prefix pass yields the logits of its
    last token, so the prefix may end there but not later.
    """
    return common_length([r.tokens for r in requests], min(r.first_scored + 1 for r in requests))


def _units(groups: Sequence[Sequence[Scored]]) -> list[_Unit]:
    units = []
    for g, requests in enumerate(groups):
        length = shared_prefix(requests)
        if length:
            units.append(_Unit(g, list(range(len(requests))), list(requests), length))
        else:  # left truncation cut the requests differently: nothing is shared, each runs on its own
            units.extend(_Unit(g, [i], [r], r.first_scored + 1) for i, r in enumerate(requests))
    return units


def _batches(units: list[_Unit], batch_size: int) -> list[list[_Unit]]:
    """Units in batches of `batch_size`, longest first; units sharing `MIN_SHARED` tokens fill batches together.

    In token order, units that share a long start are neighbours: each run of such neighbours (a family,
    e.g. one MMLU subject) fills whole batches of its own; what is left over is batched by length.
    """
    families: list[list[_Unit]] = []
    for unit in sorted(units, key=lambda u: u.prefix_tokens):
        previous = families[-1][-1] if families else None
        if previous is None or common_length([previous.prefix_tokens, unit.prefix_tokens], MIN_SHARED) < MIN_SHARED:
            families.append([])
        families[-1].append(unit)
    batches, leftover = [], []
    for family in families:
        family.sort(key=lambda u: -u.longest)
        whole = len(family) - len(family) % batch_size
        batches += [family[i:i + batch_size] for i in range(0, whole, batch_size)]
        leftover += family[whole:]
    leftover.sort(key=lambda u: -u.longest)
    batches += [leftover[i:i + batch_size] for i in range(0, len(leftover), batch_size)]
    return sorted(batches, key=lambda batch: -batch[0].longest)


def loglikelihoods(model: Llama, groups: Sequence[Sequence[Scored]], batch_size: int,
                   progress: bool = True) -> list[list[float]]:
    """Each request's summed log-probability of its targets, in the groups' shape.

    A group is the requests of one document; whatever prefix its requests share runs once.
    """
    results = [[0.0] * len(requests) for requests in groups]
    with ProgressBar(sum(len(g) for g in groups), "loglikelihood", "req", enabled=progress) as bar:
        for batch in _batches(_units(groups), batch_size):
            _score_batch(model, batch, batch_size, results)
            bar.update(sum(len(unit.requests) for unit in batch))
    return results


class _Rest(NamedTuple):
    """A request with tokens after its unit's prefix: where its prefix sits in the batch, and where it belongs."""

    row: int  # the unit's row in the prefix batch (and its cache)
    unit: _Unit
    member: int
    request: Scored


@torch.inference_mode()
def _score_batch(model: Llama, units: list[_Unit], batch_size: int, results: list[list[float]]) -> None:
    device = model.device
    # Each unit's requests continue after its prefix; the cache holds the longest prefix plus the longest rest.
    rest = max(len(r.tokens) - u.prefix for u in units for r in u.requests)
    cache = model.new_kv_cache(len(units), max(u.prefix for u in units) + rest)
    # The root: what every prefix of the batch starts with, run once. Each prefix keeps at least its last
    # token for the pass below, which yields the logits there.
    prefixes = [u.prefix_tokens for u in units]
    root = common_length(prefixes, min(u.prefix for u in units) - 1) if len(units) > 1 else 0
    root = root if root >= MIN_SHARED else 0
    if root:
        _run_root(model, prefixes[0][:root], cache)
    tokens = pad_rows([p[root:] for p in prefixes], device)  # (G, P - root)
    input_pos = root + torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    last = torch.tensor([u.prefix - 1 - root for u in units], device=device)
    prefix_logprobs = F.log_softmax(model(tokens, input_pos, cache, logits_at=last).float(), dim=-1)  # (G, V)

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


def _run_root(model: Llama, root: list[int], cache: list[KVCache]) -> None:
    """Run the tokens every row starts with in row 0 of the cache, then copy their keys and values to every row."""
    device = model.device
    tokens = torch.tensor([root], device=device)  # (1, R)
    input_pos = torch.arange(len(root), device=device)[None]  # (1, R)
    model(tokens, input_pos, [layer.rows(0, 1) for layer in cache], logits_at=torch.tensor([0], device=device))
    for layer in cache:
        layer.k[1:, :, :len(root)] = layer.k[:1, :, :len(root)]
        layer.v[1:, :, :len(root)] = layer.v[:1, :, :len(root)]


def _score_rest(model: Llama, cache: list[KVCache], rests: list[_Rest], results: list[list[float]]) -> None:
    """Run each request's tokens after its prefix on a copy of the prefix's cache; add its scored log-probs."""
    device = model.device
    rows = torch.tensor([r.row for r in rests], device=device)
    copies = [KVCache(layer.k.index_select(0, rows), layer.v.index_select(0, rows)) for layer in cache]
    tokens = pad_rows([r.request.tokens[r.unit.prefix:] for r in rests], device)  # (N, S)
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


def generate_until(llm: LLM, prompts: Sequence[str | list[dict]], stops: Sequence[str], max_new_tokens: int,
                   batch_size: int, progress: bool = True) -> list[str]:
    """Greedy continuations of the prompts, cut at the first stop sequence, as lm-eval's generate_until.

    A prompt is text (encoded with BOS) or a dialog, messages encoded in the chat format as `LLM.chat` does.
    A prompt longer than the context minus `max_new_tokens` loses its oldest tokens (BOS first), as in lm-eval.
    The text is `decode(new tokens)`, so it has no leading space, like lm-eval's.
    """
    tokenizer = llm.tokenizer
    room = llm.config.context_length - max_new_tokens
    if room < 1:
        raise LlamaforgeError(f"the task generates up to {max_new_tokens} tokens, which leaves no room for a prompt "
                              f"in the model's context of {llm.config.context_length}")
    encoded = [(tokenizer.encode(prompt, bos=True) if isinstance(prompt, str) else llm.chat_tokens(prompt))[-room:]
               for prompt in prompts]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=tuple(stops))
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), str(prompts[i])))
    texts = [""] * len(prompts)
    with ProgressBar(len(prompts), "generate", "req", enabled=progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for index, result in zip(chunk, llm.generate([encoded[i] for i in chunk], params=params), strict=True):
                texts[index] = cut_at_stops(tokenizer.decode(result.token_ids), stops)
            bar.update(len(chunk))
    return texts


@contextmanager
def batch_size_named_on_oom(device: torch.device, batch_size: int, unit: str) -> Iterator[None]:
    """Turn running out of accelerator memory into an error that says which setting to lower."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise LlamaforgeError(f"out of {device} memory with --batch-size {batch_size} ({unit} per forward pass); "
                              "lower --batch-size, or load the weights with --quantize nf4") from None
