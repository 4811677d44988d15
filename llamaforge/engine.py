"""Continuous batching: requests join and leave a running batch of KV-cache slots at every step.

One worker thread owns the model. Each step it (1) drops cancelled requests and frees their slots,
(2) admits waiting requests into free slots, (3) prefills one chunk of at most `prefill_chunk` tokens
of one prompt, so a long prompt never stalls running sequences for long, and (4) decodes one token for
every running sequence in one batched forward over the blocks that hold them. With speculation
(`LLM.speculate` K > 0) that forward checks each sequence's drafted tokens too: up to K per sequence, by prompt
lookup or from the LLM's draft model, kept where the model agrees (`verify_draft`), so a step can emit several
tokens a sequence with greedy output unchanged and sampled output of the same distribution. The KV cache
is paged (llamaforge/kv_blocks.py): one pool of blocks of `block_len` positions, `kv_cache_tokens` in all, from
which each sequence takes blocks as it grows; a request waits in the queue until the pool can promise it the
blocks its prompt and `max_new_tokens` may need, so none runs out halfway. A row's positions are its own (see
model.py), so a sequence's tokens do not depend on what else shares the batch. Token events go back through each
request's `emit` callback, called on the worker thread.

Prefix caching: a sequence's full blocks are indexed by the tokens they hold (and all before them), and a finished
sequence's blocks stay in the pool, least recently used first, until the memory is needed. A new request reads
the blocks that hold its prompt's start instead of computing them (and copies the start of a block it shares only
partly), looked up again before its first forward so that requests arriving together find what the ones
prefilled before them computed. So the next turn of a chat computes only the new turn, requests sharing a system
prompt or few-shot examples compute it once, and the pool keeps as many earlier conversations as fit in it.

A request's failure ends that request only. Per-request work (admission, prefill, event emission) is
guarded one request at a time; batched work (the decode forward, sampling) that raises is run again
one request at a time, so only the requests that fail alone are failed, each with its own error. Re-running
a forward is safe: it writes the same keys and values at the same positions. Whatever escapes that is
a fault of the engine itself: the running requests get the error and the worker keeps serving.
`health()` reports a worker that died or is stuck in one step.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from llamaforge.api import LLM
from llamaforge.errors import GenerationError, LlamaforgeError
from llamaforge.generate import (
    Decoder,
    DraftModel,
    SequenceState,
    TokenEvent,
    checked_tokens,
    draft_tokens,
    fit_prompt,
)
from llamaforge.kv_blocks import SCRATCH, BlockPool, Sequence
from llamaforge.model import BlockTable
from llamaforge.openmp import release_thread_pool
from llamaforge.sampling import SamplingParams, TokenHistory, check_logit_bias, sample, token_logprobs
from llamaforge.structured import Constraint, constrain

Emit = Callable[["TokenEvent | BaseException"], None]


class QueueFullError(LlamaforgeError):
    """The engine's waiting queue is full; the client should retry later."""


class EngineStoppedError(LlamaforgeError):
    """The engine's worker thread is not running: it was stopped, or it died."""


@dataclass(eq=False)
class EngineRequest:
    """A prompt to run, with where its events go. `emit` receives TokenEvents, then maybe an exception."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Emit
    prompt_as_context: bool = True
    submitted_at: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    # Set by the engine:
    slot: int | None = None  # its row of the repetition-penalty memory while it runs
    blocks: Sequence | None = None  # its KV blocks
    positions: int = 0  # the positions its blocks may reach (prompt, new tokens, drafts)
    prefilled: int = 0
    state: SequenceState | None = None
    last_token: int | None = None
    generated: list[int] = field(default_factory=list)  # tokens emitted so far (the drafts' context)
    drafter: DraftModel | None = None  # its draft model's cache, when the engine drafts with one
    prefix_checked: bool = False  # whether the prefix cache was searched for its prompt's start
    # Score the prompt too: each prompt token's log-probability and this many top alternatives at each position
    # (None: no), handed over on the first token's event. Such a prompt is computed whole (no prefix cache).
    prompt_logprobs: int | None = None
    prompt_scores: tuple[list, list] = field(default_factory=lambda: ([None], [None]))
    constraint: Constraint | None = None  # structured output: the grammar its tokens must follow (no speculation)
    adapter: int = 0  # the served LoRA adapter's slot (llm.adapters); 0: the base model


@dataclass
class EngineStats:
    """What the engine is doing; read by /metrics and the tests."""

    max_batch_size: int
    max_context: int
    free_slots: int  # of max_batch_size: sequences that may still join the batch
    running: int
    waiting: int
    peak_running: int
    steps: int
    batched_steps: int  # decode steps that ran more than one sequence
    prompt_tokens: int
    generated_tokens: int
    draft_tokens: int  # tokens drafted for speculative decoding and checked by the model
    accepted_tokens: int  # of those, the ones kept
    prefix_cache_queries: int  # prompt tokens of admitted requests (what the prefix cache was asked for)
    prefix_cache_hits: int  # of those, the ones whose keys and values were reused instead of computed
    cached_tokens: int  # tokens whose keys and values free blocks keep for later requests
    adapters: int  # LoRA adapters loaded beside the base (llm.adapters)
    kv_blocks: int  # blocks of the KV pool sequences can hold (the scratch block not counted)
    kv_blocks_used: int  # of those, the blocks running sequences hold (the rest are free, maybe caching)
    kv_block_len: int  # positions a block holds

    @property
    def acceptance_rate(self) -> float:
        """Accepted over drafted tokens (0 before any draft)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Reused over admitted prompt tokens (0 before any request)."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class Engine:
    """Serve many requests from one model with continuous batching; start() runs the worker thread."""

    def __init__(self, llm: LLM, max_batch_size: int = 8, max_context: int | None = None, max_queue: int = 256,
                 prefill_chunk: int = 256, stall_timeout: float = 120.0, prefix_cache: bool = True,
                 kv_cache_tokens: int | None = None, block_len: int = 16) -> None:
        """`kv_cache_tokens`: the KV pool's size in positions (default max_batch_size x max_context, the memory each
        sequence needs at its longest); `block_len`: positions a block holds (vLLM's 16 by default)."""
        if max_batch_size < 1:
            raise LlamaforgeError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if block_len < 1:
            raise LlamaforgeError(f"block_len must be >= 1, got {block_len}")
        self.llm = llm
        self.model = llm.model
        self.device = llm.device
        self.max_batch_size = max_batch_size
        self.max_context = min(max_context or llm.config.context_length, llm.config.context_length)
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.stall_timeout = stall_timeout  # a step longer than this makes health() report the engine stuck
        self.eos_id = llm.tokenizer.eos_id if llm.tokenizer is not None else llm.config.eos_token_id
        tokens = max_batch_size * self.max_context if kv_cache_tokens is None else kv_cache_tokens
        if tokens < 1:
            raise LlamaforgeError(f"kv_cache_tokens (--kv-cache-tokens) must be >= 1, got {kv_cache_tokens}")
        n_blocks = -(-tokens // block_len) + 1  # and the scratch block
        self.kv_cache_bytes = kv_cache_bytes(llm, n_blocks * block_len)
        _check_memory(self.kv_cache_bytes, self.device, n_blocks * block_len)
        self.kv_pool = self.model.new_kv_pool(n_blocks, block_len)
        self.blocks = BlockPool(n_blocks, block_len, self._copy_block)
        self.decoder = Decoder(self.model, llm.compile)  # decode steps, compiled when the LLM asks for it
        # Each slot's tokens so far, for the penalties.
        self.history = TokenHistory.empty(max_batch_size, llm.config.vocab_size, self.device)
        self.free_slots = list(range(max_batch_size))
        self.prefix_cache = prefix_cache
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.wakeup = threading.Condition()
        self.calls: deque[tuple[Callable[[], object], Future]] = deque()  # run on the worker between steps
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.step_started: float | None = None  # time.monotonic() when the current step began; None between steps
        self.peak_running = 0
        self.steps = 0
        self.batched_steps = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.speculate = llm.speculate
        self.draft_tokens = 0
        self.accepted_tokens = 0

    # --- the client side (any thread) ---------------------------------------------------------------

    def submit(self, request: EngineRequest) -> None:
        """Queue a request; GenerationError if it cannot fit a slot, QueueFullError when the queue is full.

        The request's sequence state (random generator, detokenizer, stop-string matcher) is built here, on
        the caller's thread: its cost and its errors belong to the caller, not to the step of every request.
        """
        fit_prompt(request.prompt_ids, request.params.max_new_tokens, self.max_context, truncate=False)
        check_logit_bias(request.params, self.llm.config.vocab_size)
        request.positions = min(len(request.prompt_ids) + request.params.max_new_tokens + self.speculate,
                                self.max_context)
        if self.blocks.blocks_for(request.positions) > self.blocks.usable:
            raise GenerationError(
                f"the prompt and max_new_tokens need {request.positions} positions of KV cache, more than the server's "
                f"{self.blocks.usable * self.blocks.block_len}; ask for fewer tokens, or raise --kv-cache-tokens")
        request.state = SequenceState(request.prompt_ids, request.params, self.llm.tokenizer, self.eos_id,
                                      self.device, request.prompt_as_context)
        with self.wakeup:
            if self.stopping or (self.thread is not None and not self.thread.is_alive()):
                raise EngineStoppedError("the engine is not running (the server is stopping or has failed)")
            if len(self.waiting) >= self.max_queue:
                raise QueueFullError(f"the server's queue is full ({self.max_queue} waiting requests); retry shortly")
            self.waiting.append(request)
            self.wakeup.notify()

    def cancel(self, request: EngineRequest) -> None:
        """Stop a request (its client went away); its slot is freed at the start of the next step."""
        with self.wakeup:
            request.cancelled = True
            self.wakeup.notify()

    def between_steps(self, work: Callable[[], object], timeout: float = 60.0) -> object:
        """Run `work` on the worker thread between two steps (no forward in flight: e.g. loading an adapter's
        matrices) and return what it returns or raise what it raises; from any thread but the worker."""
        future: Future = Future()
        with self.wakeup:
            if self.stopping or (self.thread is not None and not self.thread.is_alive()):
                raise EngineStoppedError("the engine is not running (the server is stopping or has failed)")
            self.calls.append((work, future))
            self.wakeup.notify()
        if self.thread is None:  # not started (tests, tools): nothing runs concurrently, so run it here
            self._run_calls()
        return future.result(timeout)

    def _run_calls(self) -> None:
        while True:
            with self.wakeup:
                if not self.calls:
                    return
                work, future = self.calls.popleft()
            try:
                future.set_result(work())
            except Exception as exc:
                future.set_exception(exc)

    def stats(self) -> EngineStats:
        with self.wakeup:
            return EngineStats(self.max_batch_size, self.max_context, len(self.free_slots), len(self.running),
                               len(self.waiting), self.peak_running, self.steps, self.batched_steps,
                               self.prompt_tokens, self.generated_tokens, self.draft_tokens, self.accepted_tokens,
                               self.prefix_cache_queries, self.prefix_cache_hits, self.blocks.cached_tokens,
                               len(self.llm.adapters.slots) if self.llm.adapters is not None else 0,
                               self.blocks.usable, self.blocks.used, self.blocks.block_len)

    def health(self) -> str | None:
        """None while the engine serves; otherwise why it does not (its worker died or is stuck in one step)."""
        if self.thread is not None and not self.thread.is_alive():
            return "the engine's worker thread has stopped; restart the server"
        started = self.step_started
        if started is not None and time.monotonic() - started > self.stall_timeout:
            return f"the engine has been in one step for {time.monotonic() - started:.0f} s"
        return None

    def start(self) -> Engine:
        """Start the worker thread. The calling thread (usually the one that loaded the model) first gives back
        its OpenMP workers: libgomp slows every parallel region of the worker while a second pool exists."""
        release_thread_pool()
        self.thread = threading.Thread(target=self._loop, name="llamaforge-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the worker after its current step; waiting and running requests get an error."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    # --- the worker thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._serve_one_step():
                pass
        finally:
            with self.wakeup:
                self.stopping = True
                leftovers = list(self.running) + list(self.waiting)
                self.waiting.clear()
            for request in leftovers:
                self._fail(request, LlamaforgeError("the server is shutting down"))
            with self.wakeup:
                calls, self.calls = list(self.calls), deque()
            for _, future in calls:
                future.set_exception(EngineStoppedError("the server is shutting down"))

    def _serve_one_step(self) -> bool:
        """Wait for work, then run one step; False once stopping. Nothing a step raises ends the worker."""
        with self.wakeup:
            while not self.stopping and not self.waiting and not self.running and not self.calls:
                self.wakeup.wait()
            if self.stopping:
                return False
        self._run_calls()
        self.step_started = time.monotonic()
        try:
            with self.wakeup:
                self._drop_cancelled()
                self._admit()
            with torch.inference_mode():
                self._step()
        except Exception as exc:  # a fault of the engine, not of one request: fail what was running, keep serving
            for request in list(self.running):
                self._fail(request, exc)
        finally:
            self.step_started = None
        return True

    def _drop_cancelled(self) -> None:
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        for request in [r for r in self.running if r.cancelled]:
            self._release(request)

    def _admit(self) -> None:
        """Move waiting requests into the batch, in order, while a sequence slot is free and the KV pool can promise
        the next one its blocks (else it waits for running sequences to finish)."""
        while self.free_slots and self.waiting:
            request = self.waiting[0]
            reuse = self.prefix_cache and request.prompt_logprobs is None  # a scored prompt computes every position
            admitted = self.blocks.admit(request.prompt_ids, request.positions, request.adapter, reuse)
            if admitted is None:
                break
            self.waiting.popleft()
            request.blocks, found = admitted
            request.slot = self.free_slots.pop(0)
            self.running.append(request)
            self._guarded(request, self._admit_one, request, found)
        self.peak_running = max(self.peak_running, len(self.running))

    def _admit_one(self, request: EngineRequest, found: int) -> None:
        """Start the prompt past what the cache held of it; make the slot's repetition-penalty memory the prompt."""
        if self.prefix_cache and request.prompt_logprobs is None:
            request.prefilled = min(found, len(request.prompt_ids) - 1)  # the last prompt token gives the logits
            self.prefix_cache_queries += len(request.prompt_ids)
        request.prefix_checked = request.prompt_logprobs is not None
        self.history.start(request.slot, request.prompt_ids if request.params.repetition_penalty != 1.0 else None)

    def forget_adapter(self, slot: int) -> None:
        """Before an adapter's slot is unloaded (on the worker, between steps): refuse while requests use it, and
        drop the keys and values kept for it (the slot may serve another adapter next)."""
        users = [r for r in [*self.running, *self.waiting] if r.adapter == slot]
        if users:
            raise LlamaforgeError(f"the adapter is in use by {len(users)} requests; unload it when they have finished")
        self.blocks.forget(slot)

    def _reuse_prefix(self, request: EngineRequest) -> None:
        """Before a prompt's first chunk: take a longer start of it from the cache if sequences prefilled since its
        admission computed one."""
        request.prefilled = self.blocks.reattach(request.blocks, request.prompt_ids, request.prefilled,
                                                 request.positions)
        request.prefix_checked = True
        self.prefix_cache_hits += request.prefilled

    def _copy_block(self, source: int, target: int, length: int) -> None:
        """Every layer's keys and values at a block's first `length` positions into another block."""
        for layer in self.kv_pool:
            layer.k[target, :, :length] = layer.k[source, :, :length]
            layer.v[target, :, :length] = layer.v[source, :, :length]

    def _index(self, request: EngineRequest) -> None:
        """Index the request's blocks that its fed tokens now fill, for later prompts to read."""
        fed = self._next_position(request)
        if self.prefix_cache and fed // self.blocks.block_len > len(request.blocks.keys):
            self.blocks.index(request.blocks, self._fed_tokens(request))

    def _guarded(self, request: EngineRequest, work: Callable, *args) -> None:
        """Run one request's work; an exception ends that request (with the error), not the step."""
        try:
            work(*args)
        except Exception as exc:
            self._fail(request, exc)

    def _isolated(self, requests: list[EngineRequest], work: Callable[[list[EngineRequest]], dict]) -> dict:
        """work(requests) -> {request: result}; if it raises, each request runs alone and only failures fail."""
        try:
            return work(requests)
        except Exception as exc:
            if len(requests) == 1:
                self._fail(requests[0], exc)
                return {}
        results = {}
        for request in requests:
            try:
                results.update(work([request]))
            except Exception as exc:
                self._fail(request, exc)
        return results

    def _fail(self, request: EngineRequest, error: BaseException) -> None:
        """End a request with an error: tell its client (if it still listens) and free its slot, keeping nothing of
        it in the prefix cache."""
        with contextlib.suppress(Exception):  # the consumer is gone; the slot is freed all the same
            request.emit(error)
        self._release(request, keep=False)

    def _release(self, request: EngineRequest, keep: bool = True) -> None:
        """Free the request's slot and blocks; with `keep` (and the prefix cache on) its blocks stay cached."""
        with self.wakeup:
            if request in self.running:
                self.running.remove(request)
                self.free_slots.append(request.slot)
                self.free_slots.sort()
                keep = keep and self.prefix_cache
                self.blocks.release(request.blocks, self._fed_tokens(request) if keep else None)

    def _fed_tokens(self, request: EngineRequest) -> list[int]:
        """The tokens whose keys and values the request's slot holds: its prompt, then what it generated, up to
        where it writes next (the last token sampled has not been fed yet)."""
        return (request.prompt_ids + request.generated)[:self._next_position(request)]

    def _step(self) -> None:
        self.steps += 1
        prefilling = [r for r in self.running if r.prefilled < len(r.prompt_ids)]
        if prefilling:
            self._guarded(prefilling[0], self._prefill, prefilling[0])
        decoding = [r for r in self.running if r.last_token is not None and not r.state.finished]
        if decoding:
            self.batched_steps += len(decoding) > 1
            if self.speculate:
                self._speculate(decoding)
            else:
                self._sample_and_emit(self._isolated(decoding, self._decode))

    def _prefill(self, request: EngineRequest) -> None:
        """Feed the next chunk (`prefill_chunk` tokens at most) of one waiting prompt.

        Capping the tokens per step keeps running sequences decoding while long prompts come in. One
        prompt per step: packing several into one padded forward measured slower (engine benchmark in
        docs/benchmarks.md), since rows of different lengths compute each other's padding.
        A prompt whose last chunk went in gets its first token sampled.
        """
        if self.prefix_cache and not request.prefix_checked:
            self._reuse_prefix(request)
        start = request.prefilled
        chunk = request.prompt_ids[start:start + self.prefill_chunk]
        scored = request.prompt_logprobs is not None
        logits = self._forward({request: (chunk, start)}, every_position=scored)[request]
        request.prefilled += len(chunk)
        self.prompt_tokens += len(chunk)
        self._index(request)
        if scored:  # logits (T, V): row j predicts the token at start + j + 1, a prompt token but after the last
            self._score_prompt(request, logits[:len(request.prompt_ids) - start - 1], start + 1)
            logits = logits[-1]
        if request.prefilled == len(request.prompt_ids):
            self._sample_and_emit({request: logits})

    def _score_prompt(self, request: EngineRequest, logits: torch.Tensor, first: int) -> None:
        """Note the log-probabilities of prompt tokens first .. first + T - 1 from the logits (T, V) before them."""
        if logits.shape[0] == 0:
            return
        targets = torch.tensor(request.prompt_ids[first:first + logits.shape[0]], device=logits.device)
        chosen, top_values, top_ids = token_logprobs(logits, targets, request.prompt_logprobs)
        request.prompt_scores[0].extend(chosen.tolist())
        request.prompt_scores[1].extend(dict(zip(ids, values, strict=True))
                                        for ids, values in zip(top_ids.tolist(), top_values.tolist(), strict=True))

    def _decode(self, requests: list[EngineRequest]) -> dict[EngineRequest, torch.Tensor]:
        """One batched forward of each request's last token; each request's logits (V,)."""
        return self._forward({r: ([r.last_token], self._next_position(r)) for r in requests}, decode=True)

    def _speculate(self, requests: list[EngineRequest]) -> None:
        """One decode step with drafts: draft for each request, check every draft in one batched forward, emit
        the tokens each request keeps (its accepted drafts, then the model's own next token)."""
        drafts = self._isolated(requests, lambda rs: {r: self._draft(r) for r in rs})
        logits = self._isolated(list(drafts), lambda rs: self._check(rs, drafts))
        for request, rows in logits.items():
            self._guarded(request, self._accept, request, rows, *drafts[request])

    def _draft(self, request: EngineRequest) -> tuple[list[int], torch.Tensor | None]:
        """The request's drafts (`draft_tokens`), from the LLM's draft model (its own cache for this request) if
        it has one, else by prompt lookup."""
        if request.constraint is not None:  # drafts would have to be checked against the grammar too
            return [], None
        if self.llm.draft is not None and request.drafter is None:
            request.drafter = DraftModel(self.llm.draft, len(request.prompt_ids) + request.params.max_new_tokens)
        return draft_tokens(request.prompt_ids + request.generated, self.speculate, request.state, request.drafter)

    def _check(self, requests: list[EngineRequest],
               drafts: dict[EngineRequest, tuple[list[int], torch.Tensor | None]]) -> dict[EngineRequest, torch.Tensor]:
        """One batched forward of each request's last token and its drafts; each request's logits (1 + d, V)."""
        inputs = {r: ([r.last_token, *drafts[r][0]], self._next_position(r)) for r in requests}
        return self._forward(inputs, every_position=True)

    def _accept(self, request: EngineRequest, logits: torch.Tensor, draft: list[int],
                draft_probs: torch.Tensor | None) -> None:
        """Emit the request's accepted drafts, then the model's own token after them (logits (1 + d, V))."""
        params = request.params
        context_before = len(request.prompt_ids) + len(request.generated)
        accepted = 0
        if request.constraint is not None:  # no drafts: one row, the next token's
            logits = constrain(logits[0], request.constraint)[None]
        tokens = checked_tokens(logits, draft, draft_probs, params, request.state.generator,
                                self.history.rows(slice(request.slot, request.slot + 1)))
        for i, (token, agreed) in enumerate(tokens):  # token i follows logits[i]
            accepted += agreed
            pick = (None, None, None)
            if params.logprobs or params.top_logprobs:
                chosen, top_values, top_ids = token_logprobs(logits[i:i + 1], torch.tensor([token], device=self.device),
                                                             params.top_logprobs)
                pick = (chosen[0], top_values[0], top_ids[0])
            self._emit_token(request, token, *pick)
            if request.state.finished:
                break
        self.draft_tokens += len(draft)
        self.accepted_tokens += accepted
        if request.drafter is not None:
            request.drafter.settle(context_before, accepted, len(draft))

    def _next_position(self, request: EngineRequest) -> int:
        """Where the request writes next: its prompt's next chunk, or its last sampled token."""
        if request.prefilled < len(request.prompt_ids):
            return request.prefilled
        return len(request.prompt_ids) + request.state.produced - 1

    def _forward(self, inputs: dict[EngineRequest, tuple[list[int], int]], decode: bool = False,
                 every_position: bool = False) -> dict[EngineRequest, torch.Tensor]:
        """One forward over the requests of `inputs` (request -> tokens, first position), a row each, reading and
        writing their KV blocks through a block table.

        Returns each request's logits (V,) after its last token, or with `every_position` after each of its tokens
        (T, V). Rows are right-padded to one width; padding tokens sit after their row's real ones, at positions the
        row writes again before it attends there, or in the scratch block where the row has no block (positions
        clamped to the context, which no prompt reaches and a sequence reaches only by writing it).
        """
        requests = list(inputs)
        width = max(len(tokens) for tokens, _ in inputs.values())
        tokens = torch.zeros(len(requests), width, dtype=torch.long)
        positions = torch.zeros(len(requests), width, dtype=torch.long)
        last_index = torch.zeros(len(requests), dtype=torch.long)
        for row, request in enumerate(requests):
            ids, start = inputs[request]
            tokens[row, :len(ids)] = torch.tensor(ids)
            last_index[row] = len(ids) - 1
            positions[row] = (start + torch.arange(width)).clamp(max=self.max_context - 1)
            self.blocks.grow(request.blocks, start + len(ids))
        kv_len = int(positions.max()) + 1  # on the host: no device sync
        table = torch.full((len(requests), self.blocks.blocks_for(kv_len)), SCRATCH, dtype=torch.long)
        for row, request in enumerate(requests):
            held = request.blocks.blocks[:table.shape[1]]
            table[row, :len(held)] = torch.tensor(held)
        pages = BlockTable(table.to(self.device), self.blocks.block_len)
        cache = [layer.paged(pages) for layer in self.kv_pool]
        with self._adapters_of(requests):
            if decode:  # one token per row: the (maybe compiled) decode step
                logits = self.decoder(tokens[:, 0].to(self.device), positions[:, 0].to(self.device), cache, kv_len)
            elif every_position:
                logits = self.model(tokens.to(self.device), positions.to(self.device), cache,
                                    kv_len=kv_len)  # (rows, T, V)
                return {r: logits[row, :len(inputs[r][0])] for row, r in enumerate(requests)}
            else:
                logits = self.model(tokens.to(self.device), positions.to(self.device), cache,
                                    logits_at=last_index.to(self.device), kv_len=kv_len)  # (rows, V)
        return {r: logits[row] for row, r in enumerate(requests)}

    @contextlib.contextmanager
    def _adapters_of(self, requests: list[EngineRequest]) -> Iterator[None]:
        """During a forward over `requests` (a row each): each row's served LoRA adapter (the base where none is)."""
        rows = [r.adapter for r in requests]
        if not any(rows):
            yield
            return
        adapters = self.llm.adapters
        adapters.selection.select(rows, self.device)
        try:
            yield
        finally:
            adapters.selection.select(None, self.device)

    def _sample_and_emit(self, logits: dict[EngineRequest, torch.Tensor]) -> None:
        """Pick each request's next token (isolated per request on failure), then hand it to its client."""
        picks = self._isolated(list(logits), lambda requests: self._sample(requests, logits))
        for request, pick in picks.items():
            self._guarded(request, self._emit_token, request, *pick)

    def _sample(self, requests: list[EngineRequest], logits: dict[EngineRequest, torch.Tensor]) -> dict:
        """{request: (token id, its log-prob, top log-probs, their ids)}; log-probs None when nobody asked."""
        rows = torch.tensor([r.slot for r in requests], device=self.device)
        batch_logits = torch.stack([logits[r] for r in requests])  # (B, V)
        params = [r.params for r in requests]
        # Constrained rows sample among the tokens their grammar allows; log-probabilities stay the model's.
        allowed = batch_logits
        if any(r.constraint is not None for r in requests):
            allowed = torch.stack([constrain(row, r.constraint) if r.constraint is not None else row
                                   for row, r in zip(batch_logits, requests, strict=True)])
        next_ids = sample(allowed, params, [r.state.generator for r in requests], self.history.rows(rows))  # (B,)
        self.history.add(next_ids, rows)
        picks = {request: (token_id, None, None, None) for request, token_id in zip(requests, next_ids.tolist(),
                                                                                      strict=True)}
        if any(p.logprobs or p.top_logprobs for p in params):
            chosen, top_values, top_ids = token_logprobs(batch_logits, next_ids, max(p.top_logprobs for p in params))
            for index, request in enumerate(requests):
                picks[request] = (picks[request][0], chosen[index], top_values[index], top_ids[index])
        return picks

    def _emit_token(self, request: EngineRequest, token_id: int, chosen: torch.Tensor | None,
                    top_values: torch.Tensor | None, top_ids: torch.Tensor | None) -> None:
        if request.constraint is not None:
            request.constraint.accept(token_id)
        event = request.state.accept(0, token_id)
        if chosen is not None:
            request.state.attach_logprobs(event, chosen, top_values, top_ids)
        if request.prompt_logprobs is not None and request.state.produced == 1:
            event.prompt_logprobs, event.prompt_top_logprobs = request.prompt_scores
        request.last_token = token_id
        request.generated.append(token_id)
        self.generated_tokens += 1
        self._index(request)
        request.emit(event)
        if event.finish_reason is not None:
            self._release(request)


def kv_cache_bytes(llm: LLM, tokens: int) -> int:
    """Bytes of keys and values for `tokens` positions."""
    config = llm.config
    return tokens * 2 * config.n_layers * config.n_kv_heads * config.head_dim * llm.dtype.itemsize


def _available_bytes(device: torch.device) -> int | None:
    """Free memory where the cache will live (None where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _check_memory(needed: int, device: torch.device, tokens: int) -> None:
    """Refuse, with the numbers and the fix, a KV cache that would not fit (rather than die allocating it)."""
    available = _available_bytes(device)
    if available is not None and needed > available:
        raise LlamaforgeError(
            f"the KV cache of {tokens} tokens needs {needed / 2**30:.1f} GiB, but only {available / 2**30:.1f} GiB is "
            f"free on {device}; lower --kv-cache-tokens (or --max-batch-size or --max-context)"
        )
