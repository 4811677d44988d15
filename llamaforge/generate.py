"""Prefill, decode and the generation loop: batches of prompts in, tokens and text deltas out.

Prompts of different lengths are right-padded for one prefill; each row then decodes at its own
position (see model.py), so no row waits on or sees another's padding. Text is released through a
`StreamDecoder` and a `StopStringMatcher`, so a delta is never emitted and then taken back.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from llamaforge.errors import GenerationError
from llamaforge.model import KVCache, Llama
from llamaforge.quantize import kernels
from llamaforge.sampling import (
    SamplingParams,
    TokenHistory,
    distribution,
    draw,
    make_generator,
    penalized,
    sample,
    token_logprobs,
)
from llamaforge.tokenizer import StreamDecoder, Tokenizer


@dataclass
class TokenEvent:
    """One generated token of one row, with the text it released and whether the row is done."""

    row: int
    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None  # "stop" | "length" once the row is finished
    eos: bool = False  # the token is EOS (reported, but not part of the generated text or ids)
    # On a request's first token, where it asked for its prompt's log-probabilities (the engine's prompt_logprobs):
    # each prompt token's given the tokens before it (None for the first), and the top alternatives there.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None


@dataclass
class Generation:
    """The result of one prompt: new tokens only, as DESIGN.md fixes."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    timings: dict[str, float] = field(default_factory=dict)


class StopStringMatcher:
    """Hold back text that might be the start of a stop string; cut the text at the first stop string.

    Each stop string keeps a Knuth-Morris-Pratt state: the length of its longest prefix that the text so
    far ends with. A new character moves each state in amortised constant time, so the work per token
    does not grow with the stop strings' lengths, and the text held back is exactly the longest such
    prefix (it can still become a stop string; anything before it cannot).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.fallbacks = [_prefix_function(stop) for stop in self.stops]
        self.matched = [0] * len(self.stops)
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        self.pending += delta
        if not self.stops:
            text, self.pending = self.pending, ""
            return text, False
        first_stop = None  # where in `pending` the earliest stop string found in this delta starts
        offset = len(self.pending) - len(delta)
        for index, char in enumerate(delta, start=offset):
            for k, stop in enumerate(self.stops):
                matched = self._advance(k, char)
                if matched == len(stop):
                    start = index + 1 - len(stop)
                    first_stop = start if first_stop is None else min(first_stop, start)
                    matched = self.fallbacks[k][matched - 1]
                self.matched[k] = matched
        if first_stop is not None:
            text, self.pending, self.matched = self.pending[:first_stop], "", [0] * len(self.stops)
            return text, True
        cut = len(self.pending) - max(self.matched)
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, False

    def _advance(self, k: int, char: str) -> int:
        """Stop string k's matched length after one more character."""
        stop, fallback, matched = self.stops[k], self.fallbacks[k], self.matched[k]
        while matched and stop[matched] != char:
            matched = fallback[matched - 1]
        return matched + (stop[matched] == char)

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


def _prefix_function(text: str) -> list[int]:
    """KMP's table: entry i is the length of the longest proper prefix of text[:i + 1] that also ends it."""
    table = [0] * len(text)
    length = 0
    for i in range(1, len(text)):
        while length and text[i] != text[length]:
            length = table[length - 1]
        length += text[i] == text[length]
        table[i] = length
    return table


def fit_prompt(prompt_ids: list[int], max_new_tokens: int, context_length: int, truncate: bool) -> list[int]:
    """Check that prompt + max_new_tokens fits the context; with `truncate`, drop the oldest prompt tokens."""
    if not prompt_ids:
        raise GenerationError("the prompt is empty; give at least one token (a str prompt always gets BOS)")
    total = len(prompt_ids) + max_new_tokens
    if total <= context_length:
        return prompt_ids
    room = context_length - max_new_tokens
    if not truncate or room < 1:
        raise GenerationError(
            f"the prompt has {len(prompt_ids)} tokens and max_new_tokens is {max_new_tokens}: {total} tokens "
            f"exceed the model's context of {context_length}; shorten the prompt, lower max_new_tokens"
            + (", or ask for truncation" if room >= 1 else "")
        )
    # Keep BOS at the front: the model was trained with it and behaves oddly without.
    head = prompt_ids[:1] if room > 1 else []
    return head + prompt_ids[len(prompt_ids) - (room - len(head)):]


class SequenceState:
    """One sequence being generated: its sampling generator, text release, stop strings and token budget.

    Shared by `generate_events` (a fixed batch) and the server's engine (slots that come and go), so
    both turn tokens into text and finish reasons the same way.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer | None, eos_id: int,
                 device: torch.device, prompt_as_context: bool = True) -> None:
        if tokenizer is None and params.stop:
            raise GenerationError("stop strings need a tokenizer; load the model with one")
        self.prompt_ids = prompt_ids
        self.params = params
        self.eos_id = eos_id
        self.generator = make_generator(params.seed, device)
        self.decoder = StreamDecoder(tokenizer, prompt_ids if prompt_as_context else ()) if tokenizer else None
        self.matcher = StopStringMatcher(params.stop)
        self.produced = 0
        self.finished = False

    def accept(self, row: int, token_id: int) -> TokenEvent:
        """Take the next sampled token; return its event (text released, finish reason if it ended)."""
        self.produced += 1
        is_eos = token_id == self.eos_id and not self.params.ignore_eos
        is_last = self.produced >= self.params.max_new_tokens
        text, stopped = "", False
        if self.decoder is not None:
            final = is_eos or is_last
            delta = self.decoder.push(token_id) + (self.decoder.flush() if final else "")
            text, stopped = self.matcher.feed(delta)
            if final and not stopped:
                text += self.matcher.flush()
        event = TokenEvent(row, token_id, text, eos=is_eos)
        event.finish_reason = "stop" if is_eos or stopped else "length" if is_last else None
        self.finished = event.finish_reason is not None
        return event

    def attach_logprobs(self, event: TokenEvent, chosen: torch.Tensor, top_values: torch.Tensor,
                        top_ids: torch.Tensor) -> None:
        """Fill the event's log-probabilities from this row's (chosen, top values, top ids), if asked for."""
        if self.params.logprobs or self.params.top_logprobs:
            n = self.params.top_logprobs
            event.logprob = chosen.item()
            event.top_logprobs = dict(zip(top_ids[:n].tolist(), top_values[:n].tolist(), strict=True))


@torch.inference_mode()
def generate_events(model: Llama, tokenizer: Tokenizer | None, prompts: Sequence[list[int]],
                    params: Sequence[SamplingParams], prompt_as_context: bool = True,
                    timings: dict[str, float] | None = None, compile: bool = False,
                    speculate: int = 0, draft_model: Llama | None = None) -> Iterator[TokenEvent]:
    """Run prompts as one batch; yield a TokenEvent per generated token until every row has finished.

    With `prompt_as_context`, each row's text is what follows its prompt's text (a leading space kept);
    without, it is `tokenizer.decode(new_ids)`, as Meta's chat_completion returns it. With `compile`, decode
    steps run torch.compile'd (see `Decoder`); time spent compiling is reported as `compile_s`. With
    `speculate` K > 0, one prompt without log-probabilities decodes speculatively (`speculative_events`), with
    drafts from `draft_model` if given, else by prompt lookup.
    """
    if speculate > 0 and len(prompts) == 1 and not (params[0].logprobs or params[0].top_logprobs):
        yield from speculative_events(model, tokenizer, list(prompts[0]), params[0], speculate, prompt_as_context,
                                      timings, draft_model)
        return
    device = model.device
    eos_id = tokenizer.eos_id if tokenizer is not None else model.config.eos_token_id
    sequences = [SequenceState(prompt, p, tokenizer, eos_id, device, prompt_as_context)
                 for prompt, p in zip(prompts, params, strict=True)]
    batch = len(prompts)
    lengths = [len(p) for p in prompts]
    top_n = max(p.top_logprobs for p in params)
    want_logprobs = any(p.logprobs or p.top_logprobs for p in params)

    started = time.perf_counter()
    tokens = pad_rows(prompts, device)  # (B, T)
    cache_len = max(n + p.max_new_tokens for n, p in zip(lengths, params, strict=True))
    kv_cache = model.new_kv_cache(batch, cache_len)
    decoder = Decoder(model, compile)
    furthest = max(lengths)  # one past the largest position written so far, known here without a device sync
    positions = torch.tensor(lengths, device=device)
    input_pos = torch.arange(tokens.shape[1], device=device).expand(batch, -1)
    logits = model(tokens, input_pos, kv_cache, logits_at=positions - 1)  # (B, V)
    history = TokenHistory.empty(batch, model.config.vocab_size, device)
    if any(p.repetition_penalty != 1.0 for p in params):
        history.seen.scatter_(1, tokens, True)
    first_token_at = None
    while True:
        next_ids = sample(logits, list(params), [s.generator for s in sequences], history)  # (B,)
        if want_logprobs:
            chosen, top_values, top_ids = token_logprobs(logits, next_ids, top_n)
        history.add(next_ids)
        for row, token_id in enumerate(next_ids.tolist()):
            if sequences[row].finished:
                continue
            event = sequences[row].accept(row, token_id)
            if want_logprobs:
                sequences[row].attach_logprobs(event, chosen[row], top_values[row], top_ids[row])
            yield event
        if first_token_at is None:
            first_token_at = time.perf_counter()
        active = [not s.finished for s in sequences]
        if not any(active):
            break
        logits = decoder(next_ids, positions, kv_cache, min(furthest + 1, cache_len))
        furthest += 1
        # Finished rows stay in the batch but stop advancing, so they never write past their cache room.
        positions = torch.where(torch.tensor(active, device=device), positions + 1, positions)
    if timings is not None:
        produced = [s.produced for s in sequences]
        timings.update(prefill_s=first_token_at - started,
                       decode_s=time.perf_counter() - first_token_at - decoder.compile_s,
                       prompt_tokens=sum(lengths), new_tokens=sum(produced),
                       decode_steps=max(produced) - 1 - decoder.compiling_steps)
        if compile:
            timings["compile_s"] = decoder.compile_s


def propose_ngram(context: Sequence[int], k: int, max_ngram: int = 3) -> list[int]:
    """Prompt-lookup drafting: the (up to k) tokens that followed the latest earlier occurrence of the context's
    last n tokens, trying n = max_ngram first, down to 1; [] when the tail never occurred before."""
    if k < 1:
        return []
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        tail = list(context[-n:])
        for start in range(len(context) - n - 1, -1, -1):
            if list(context[start:start + n]) == tail:
                return list(context[start + n:start + n + k])
    return []


def verify_draft(logits: torch.Tensor, draft: int, params: SamplingParams, generator: torch.Generator,
                 history: TokenHistory, draft_probs: torch.Tensor | None = None) -> tuple[int, bool]:
    """The token this position emits given a drafted one, and whether that is the draft.

    Greedy: the argmax, which accepts the draft exactly when plain decoding would have picked it. Sampling: the
    standard rule (Leviathan et al. 2023; Chen et al. 2023): accept with probability min(1, p(draft) / q(draft)),
    else draw from max(p - q, 0) renormalised, where q (V,) is the distribution the draft was drawn from (None:
    a deterministic draft, q one-hot). Either way the token is distributed as p, as plain decoding draws it.
    """
    logits = penalized(logits[None], [params], history)  # (1, V); history: the row's (1, V)
    if params.greedy:
        token = int(logits.argmax())
        return token, token == draft
    probs = distribution(logits, [params])[0]  # (V,)
    q = draft_probs if draft_probs is not None else torch.zeros_like(probs).index_fill_(0, torch.tensor(draft), 1.0)
    if torch.rand((), generator=generator, device=probs.device) * q[draft] < probs[draft]:
        return draft, True
    residual = (probs - q).clamp_(min=0)
    return int(draw(residual[None] / residual.sum(), [generator])[0]), False


class DraftModel:
    """Drafts with a smaller model of the same vocabulary, K tokens a step, keeping its own KV cache in step with
    the text: the tokens it has not seen yet go in first, its rejected drafts are overwritten later."""

    def __init__(self, model: Llama, max_len: int) -> None:
        self.model = model
        self.cache = model.new_kv_cache(1, max_len)
        self.written = 0  # positions of the text whose keys and values the cache holds

    def propose(self, context: list[int], k: int, params: SamplingParams,
                generator: torch.Generator) -> tuple[list[int], torch.Tensor | None]:
        """Up to k drafted tokens after `context`, and the distributions (k, V) they were drawn from."""
        device = self.model.device
        drafts, dists = [], []
        feed = context[self.written:]
        for _ in range(k):
            inputs = torch.tensor([feed], device=device)
            positions = torch.arange(self.written, self.written + len(feed), device=device)[None]
            logits = self.model(inputs, positions, self.cache, logits_at=torch.tensor([len(feed) - 1], device=device),
                                kv_len=self.written + len(feed))  # (1, V)
            self.written += len(feed)
            probs = distribution(logits.float(), [params])  # (1, V): the proposal q
            token = int(logits.argmax()) if params.greedy else int(draw(probs, [generator])[0])
            drafts.append(token)
            dists.append(probs[0])
            feed = [token]
        return drafts, torch.stack(dists) if dists else None

    def settle(self, context_before: int, accepted: int, proposed: int) -> None:
        """After a verify step: the cache is right up to the context plus the accepted drafts it was fed."""
        self.written = min(self.written, context_before + min(accepted, max(proposed - 1, 0)))


def draft_tokens(context: list[int], speculate: int, state: SequenceState,
                 drafter: DraftModel | None) -> tuple[list[int], torch.Tensor | None]:
    """Up to `speculate` tokens drafted after `context`, by `drafter` or else by prompt lookup, and the
    distributions (d, V) they were drawn from (None for prompt lookup, whose drafts are certain). Drafts stop short
    of the sequence's token budget, so every position a check writes stays inside its room."""
    room = min(speculate, state.params.max_new_tokens - state.produced - 1)
    if drafter is None:
        return propose_ngram(context, room), None
    return drafter.propose(context, room, state.params, state.generator)


def checked_tokens(logits: torch.Tensor, draft: list[int], draft_probs: torch.Tensor | None, params: SamplingParams,
                   generator: torch.Generator, history: TokenHistory) -> Iterator[tuple[int, bool]]:
    """The tokens one check of `draft` emits, in order, with whether each is an accepted draft: the drafts the
    model agrees with (`verify_draft`), then its own token after them. `logits` (1 + d, V) follow the last token and
    each draft; the row's `history` (1, V) notes each token as it is chosen. Stop iterating once the sequence has
    finished."""
    for i in range(len(draft) + 1):
        if i < len(draft):
            token, agreed = verify_draft(logits[i], draft[i], params, generator, history,
                                         None if draft_probs is None else draft_probs[i])
        else:
            token, agreed = int(sample(logits[i:i + 1], [params], [generator], history)[0]), False
        history.add(torch.tensor([token], device=logits.device))
        yield token, agreed
        if not agreed:
            return


@torch.inference_mode()
def speculative_events(model: Llama, tokenizer: Tokenizer | None, prompt: list[int], params: SamplingParams,
                       speculate: int, prompt_as_context: bool = True, timings: dict[str, float] | None = None,
                       draft_model: Llama | None = None) -> Iterator[TokenEvent]:
    """`generate_events` for one prompt with speculative decoding: each step drafts up to `speculate` tokens, by
    prompt lookup from the text so far (`propose_ngram`) or with `draft_model` (`DraftModel`), checks them all in
    one forward and keeps the longest run the model agrees with, plus the model's own next token. Greedy output
    equals plain greedy decoding's; sampled output has the same distribution (`verify_draft`)."""
    device = model.device
    eos_id = tokenizer.eos_id if tokenizer is not None else model.config.eos_token_id
    state = SequenceState(prompt, params, tokenizer, eos_id, device, prompt_as_context)
    started = time.perf_counter()
    kv_cache = model.new_kv_cache(1, len(prompt) + params.max_new_tokens)
    logits = model(pad_rows([prompt], device), torch.arange(len(prompt), device=device)[None], kv_cache,
                   logits_at=torch.tensor([len(prompt) - 1], device=device))  # (1, V)
    history = TokenHistory.empty(1, model.config.vocab_size, device)
    history.start(0, prompt if params.repetition_penalty != 1.0 else None)
    token = int(sample(logits, [params], [state.generator], history)[0])
    first_token_at = time.perf_counter()
    generated, position, steps, proposed, accepted = [token], len(prompt), 0, 0, 0
    drafter = DraftModel(draft_model, len(prompt) + params.max_new_tokens) if draft_model else None
    history.add(torch.tensor([token], device=device))
    yield state.accept(0, token)
    while not state.finished:
        draft, draft_probs = draft_tokens(prompt + generated, speculate, state, drafter)
        agreed_here = 0
        inputs = torch.tensor([[generated[-1], *draft]], device=device)  # (1, 1 + d) from `position` on
        positions = torch.arange(position, position + len(inputs[0]), device=device)[None]
        logits = model(inputs, positions, kv_cache, kv_len=position + len(inputs[0]))[0]  # (1 + d, V)
        steps, proposed = steps + 1, proposed + len(draft)
        for token, agreed in checked_tokens(logits, draft, draft_probs, params, state.generator, history):
            accepted += agreed
            agreed_here += agreed
            generated.append(token)
            yield state.accept(0, token)
            if state.finished:
                break
        if drafter is not None:
            drafter.settle(position + 1, agreed_here, len(draft))
        # The newest token's key and value are written by the next step, at the position after its context.
        position = len(prompt) + len(generated) - 1
    if timings is not None:
        timings.update(prefill_s=first_token_at - started, decode_s=time.perf_counter() - first_token_at,
                       prompt_tokens=len(prompt), new_tokens=state.produced, decode_steps=state.produced - 1,
                       verify_steps=steps, draft_tokens=proposed, accepted_tokens=accepted,
                       acceptance_rate=accepted / proposed if proposed else 0.0)


def pad_rows(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Rows of ids right-padded with 0 into one (B, T) tensor, built on the host and copied once."""
    tokens = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return tokens.to(device)


def collect(events: Iterator[TokenEvent], prompts: Sequence[list[int]],
            params: Sequence[SamplingParams]) -> list[Generation]:
    """Gather a batch's events into one Generation per prompt (EOS itself is not in token_ids)."""
    results = [Generation("", [], "", len(p), [] if q.logprobs else None, [] if q.top_logprobs else None)
               for p, q in zip(prompts, params, strict=True)]
    for event in events:
        result = results[event.row]
        result.text += event.text
        if event.eos:
            result.finish_reason = "stop"
            continue
        result.token_ids.append(event.token_id)
        if result.logprobs is not None:
            result.logprobs.append(event.logprob)
        if result.top_logprobs is not None:
            result.top_logprobs.append(event.top_logprobs)
        if event.finish_reason:
            result.finish_reason = event.finish_reason
    return results


def decode_one_token(model: Llama, token_ids: torch.Tensor, input_pos: torch.Tensor, kv_cache: list[KVCache],
                     kv_len: int | None = None) -> torch.Tensor:
    """Logits (B, V) for one new token per row (B,) written at positions (B,); attention reads the cache's first
    `kv_len` positions (default: up to the largest position)."""
    return model(token_ids[:, None], input_pos[:, None], kv_cache, logits_at=torch.zeros_like(input_pos),
                 kv_len=kv_len)


# Attention lengths a compiled step is specialised for come in steps of this many positions, so a compiled graph
# serves 256 decode steps, and the masked-out tail it reads costs less than a recompile.
KV_BUCKET = 256


class Decoder:
    """Runs decode steps, eagerly or compiled, and accounts for compile time.

    Steps go through the model's fused decode layers where it has them (quantize.fused: all decoder layers in one
    C call, the same numbers as the layer-by-layer forward and faster than either way below); the rest as follows.

    Compiled: `decode_one_token` under torch.compile (`compiled_decode`), whose graphs every generate call and
    the engine reuse. On the CPU that fuses the work between matmuls into
    generated C++ and calls the int8/int4 kernel as one operator; on CUDA, mode "reduce-overhead" replays the
    step as a CUDA graph. Shapes change with the batch size and the attention length, bucketed by KV_BUCKET;
    torch recompiles for a new shape once, then treats it as dynamic.
    """

    def __init__(self, model: Llama, compile: bool) -> None:
        self.model = model
        self.compiled = compiled_decode(model.device.type == "cuda") if compile else None
        self.compile_s = 0.0  # seconds spent in steps that compiled a graph
        self.compiling_steps = 0

    def __call__(self, token_ids: torch.Tensor, input_pos: torch.Tensor, kv_cache: list[KVCache],
                 kv_len: int) -> torch.Tensor:
        """Logits (B, V) of one step; `kv_len` is one past the largest position, counted on the host."""
        fused = getattr(self.model, "fused_decode", None)
        if fused is not None and fused.takes(token_ids, kv_cache):
            return fused(token_ids, input_pos, kv_cache)
        if self.compiled is None:
            return decode_one_token(self.model, token_ids, input_pos, kv_cache, kv_len)
        bucket = min(-(-kv_len // KV_BUCKET) * KV_BUCKET, kv_cache[0].capacity)
        graphs = compiled_graph_count()
        started = time.perf_counter()
        logits = self.compiled(self.model, token_ids, input_pos, kv_cache, bucket)
        if compiled_graph_count() != graphs:
            self.compile_s += time.perf_counter() - started
            self.compiling_steps += 1
        return logits


@functools.cache
def compiled_decode(cuda: bool) -> Callable[..., torch.Tensor]:
    """`decode_one_token` under torch.compile, made once per process (and device kind).

    The model is an argument, not a closure: torch treats its weights as inputs, so models of one shape and
    dtype share the compiled graphs, and a copy of a model never calls into its original.
    """
    kernels.mark_constants_for_compile()
    # emulate_precision_casts: round where eager rounds to bfloat16 between fused ops, so compiled tokens are
    # eager's tokens, not a near-tie away from them.
    return torch.compile(decode_one_token, mode="reduce-overhead" if cuda else None,
                         options={"emulate_precision_casts": True})


def compiled_graph_count() -> int:
    """How many graphs torch.compile has built in this process (its own counter; 0 if torch stops keeping it)."""
    from torch._dynamo.utils import counters

    return counters["stats"].get("unique_graphs", 0)
