"""The continuous-batching engine without HTTP: results equal to one-at-a-time generation."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from factories import wait_for

from llamaforge.api import LLM
from llamaforge.engine import Emit, Engine, EngineRequest, QueueFullError
from llamaforge.errors import GenerationError, LlamaforgeError
from llamaforge.generate import TokenEvent
from llamaforge.openmp import libgomp
from llamaforge.sampling import SamplingParams


def run_all(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[TokenEvent]]:
    results: list[list[TokenEvent]] = [[] for _ in prompts]
    remaining = [len(prompts)]
    done = threading.Event()

    def emitter(index: int):
        def emit(event: TokenEvent | BaseException) -> None:
            assert not isinstance(event, BaseException), event
            results[index].append(event)
            if event.finish_reason:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()
        return emit

    for index, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.submit(EngineRequest(prompt, p, emitter(index)))
    assert done.wait(120), "the engine did not finish every request"
    return results


@pytest.mark.parametrize(("batch", "chunk"), [(4, 7), (3, 256), (1, 5)])
def test_engine_equals_generate(tiny_llm: LLM, batch: int, chunk: int) -> None:
    """More requests than slots, prompts longer than a prefill chunk, mixed lengths and budgets."""
    texts = [f"Prompt {i}: " + "llamas hum " * i for i in range(10)]
    prompts = [tiny_llm.tokenizer.encode(t, bos=True) for t in texts]
    params = [SamplingParams(max_new_tokens=5 + 3 * i, temperature=0.0, ignore_eos=True) for i in range(10)]
    engine = Engine(tiny_llm, max_batch_size=batch, prefill_chunk=chunk).start()
    try:
        results = run_all(engine, prompts, params)
    finally:
        engine.stop()
    for prompt, p, events in zip(prompts, params, results, strict=True):
        expected = tiny_llm.generate(prompt, params=p)
        assert [e.token_id for e in events] == expected.token_ids
        assert "".join(e.text for e in events) == expected.text
    stats = engine.stats()
    assert stats.free_slots == batch and stats.running == 0
    assert stats.peak_running == batch and (stats.batched_steps > 0) == (batch > 1)
    # Every prompt starts "Prompt": later ones reuse that start from the prefix cache instead of computing it.
    assert stats.prefix_cache_queries == stats.prompt_tokens + stats.prefix_cache_hits == sum(len(p) for p in prompts)
    assert stats.prefix_cache_hits > 0


def test_queue_bound(tiny_llm: LLM) -> None:
    engine = Engine(tiny_llm, max_batch_size=1, max_queue=2)  # not started: nothing leaves the queue
    request = EngineRequest([1, 5], SamplingParams(max_new_tokens=2), lambda event: None)
    engine.submit(request)
    engine.submit(EngineRequest([1, 5], SamplingParams(max_new_tokens=2), lambda event: None))
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.submit(EngineRequest([1, 5], SamplingParams(max_new_tokens=2), lambda event: None))


def test_requests_that_cannot_fit_a_slot_are_refused(tiny_llm: LLM) -> None:
    engine = Engine(tiny_llm, max_batch_size=1, max_context=64)
    with pytest.raises(GenerationError, match="the prompt has 60 tokens and max_new_tokens is 10: 70 tokens exceed"):
        engine.submit(EngineRequest([1] * 60, SamplingParams(max_new_tokens=10), lambda event: None))


def test_a_kv_cache_that_cannot_fit_is_refused_before_allocating(tiny_llm: LLM, monkeypatch) -> None:
    import llamaforge.engine as engine_module

    config = tiny_llm.config  # 2 layers x 2 KV heads x 16 dims, float32: 512 bytes a token
    assert engine_module.kv_cache_bytes(tiny_llm, 512) == 512 * 2 * config.n_layers * config.n_kv_heads * \
        config.head_dim * 4
    monkeypatch.setattr(engine_module, "_available_bytes", lambda device: 100_000)
    with pytest.raises(LlamaforgeError, match=r"KV cache of 528 tokens needs .* GiB, but only .* GiB is free on cpu; "
                                              r"lower --kv-cache-tokens \(or --max-batch-size or --max-context\)"):
        Engine(tiny_llm, max_batch_size=4)  # 4 x 128 positions, in blocks of 16, and the scratch block
    assert Engine(tiny_llm, max_batch_size=1, max_context=64).kv_cache_bytes == (64 + 16) * 512
    assert Engine(tiny_llm, max_batch_size=8, kv_cache_tokens=100, block_len=8).kv_cache_bytes == (104 + 8) * 512
    with pytest.raises(LlamaforgeError, match=r"kv_cache_tokens \(--kv-cache-tokens\) must be >= 1, got 0"):
        Engine(tiny_llm, kv_cache_tokens=0)


# --- one request's failure ends that request only --------------------------------------------------------

class Collector:
    """Events of one request, and its error if it got one; `done` once it finished or failed."""

    def __init__(self) -> None:
        self.events: list[TokenEvent] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def __call__(self, item: TokenEvent | BaseException) -> None:
        if isinstance(item, BaseException):
            self.error = item
            self.done.set()
            return
        self.events.append(item)
        if item.finish_reason:
            self.done.set()


VICTIM_SEED = 666  # the injected faults below strike the request with this seed only


def _strikes_victim(requests) -> bool:
    return any(r.params.seed == VICTIM_SEED for r in requests)


def inject_admission(monkeypatch, engine: Engine, victim: Collector) -> Emit:
    original = engine._admit_one

    def admit_one(request, found):
        if request.params.seed == VICTIM_SEED:
            raise RuntimeError("injected")
        original(request, found)
    monkeypatch.setattr(engine, "_admit_one", admit_one)
    return victim


def _fail_forwards(monkeypatch, engine: Engine, strikes) -> None:
    """Make a forward over requests `inputs` raise where strikes(victim request, inputs) says, the victim in it."""
    original = engine._forward

    def forward(inputs, decode=False, every_position=False):
        victim = next((r for r in inputs if r.params.seed == VICTIM_SEED), None)
        if victim is not None and strikes(victim, inputs):
            raise RuntimeError("injected")
        return original(inputs, decode, every_position)
    monkeypatch.setattr(engine, "_forward", forward)


def inject_prefill(monkeypatch, engine: Engine, victim: Collector) -> Emit:
    _fail_forwards(monkeypatch, engine, lambda request, inputs: any(len(t) > 1 for t, _ in inputs.values()))
    return victim


def inject_decode(monkeypatch, engine: Engine, victim: Collector) -> Emit:
    """The batched decode forward fails from the victim's fourth token on, with the victim in the batch."""
    _fail_forwards(monkeypatch, engine, lambda request, inputs: request.state.produced >= 3 and all(
        len(t) == 1 for t, _ in inputs.values()))
    return victim


def inject_sampling(monkeypatch, engine: Engine, victim: Collector) -> Emit:
    import llamaforge.engine as engine_module

    original = engine_module.sample

    def sample(logits, params, generators, history=None):
        if any(p.seed == VICTIM_SEED for p in params):
            raise RuntimeError("injected")
        return original(logits, params, generators, history)
    monkeypatch.setattr(engine_module, "sample", sample)
    return victim


def inject_emit(monkeypatch, engine: Engine, victim: Collector) -> Emit:
    """The victim's consumer raises on its third token (as a closed event loop would)."""
    def emit(item):
        if not isinstance(item, BaseException) and len(victim.events) == 2:
            raise RuntimeError("injected")
        victim(item)
    return emit


@pytest.mark.parametrize("stage", ["admission", "prefill", "decode", "sampling", "emit"])
def test_a_fault_in_one_request_ends_that_request_only(tiny_llm: LLM, monkeypatch, stage: str) -> None:
    engine = Engine(tiny_llm, max_batch_size=4, prefill_chunk=8)
    prompts = [tiny_llm.tokenizer.encode(f"Request {i}: llamas hum", bos=True) for i in range(6)]
    params = [SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True,
                             seed=VICTIM_SEED if i == 2 else i) for i in range(6)]
    collectors = [Collector() for _ in prompts]
    emits = list(collectors)
    emits[2] = globals()[f"inject_{stage}"](monkeypatch, engine, collectors[2])
    engine.start()
    try:
        for prompt, p, emit in zip(prompts, params, emits, strict=True):
            engine.submit(EngineRequest(prompt, p, emit))
        assert all(c.done.wait(60) for c in collectors), "a request was left without an answer"
        # The engine is still serving: a new request after the fault runs normally.
        after = Collector()
        engine.submit(EngineRequest(prompts[0], params[0], after))
        assert after.done.wait(60) and after.error is None
    finally:
        engine.stop()
    assert isinstance(collectors[2].error, RuntimeError) and "injected" in str(collectors[2].error)
    for index, collector in enumerate(collectors):
        if index != 2:
            expected = tiny_llm.generate(prompts[index], params=params[index]).token_ids
            assert collector.error is None and [e.token_id for e in collector.events] == expected
    stats = engine.stats()
    assert stats.free_slots == 4 and stats.running == 0 and stats.waiting == 0


def test_the_worker_survives_a_fault_of_the_engine_itself(tiny_llm: LLM, monkeypatch) -> None:
    """A bug outside any one request's work fails what was running, and the worker keeps serving."""
    engine = Engine(tiny_llm, max_batch_size=2)
    original, calls = engine._step, []

    def step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected engine bug")
        original()
    monkeypatch.setattr(engine, "_step", step)
    engine.start()
    try:
        first = Collector()
        engine.submit(EngineRequest([1, 5, 6], SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True),
                                    first))
        assert first.done.wait(60) and "injected engine bug" in str(first.error)
        second = Collector()
        engine.submit(EngineRequest([1, 5, 6], SamplingParams(max_new_tokens=5, temperature=0.0), second))
        assert second.done.wait(60) and second.error is None and second.events
        assert engine.health() is None
    finally:
        engine.stop()
    assert engine.stats().free_slots == 2


def test_health_reports_a_dead_or_stuck_worker(tiny_llm: LLM, monkeypatch) -> None:
    from llamaforge.engine import EngineStoppedError

    engine = Engine(tiny_llm, max_batch_size=1, stall_timeout=0.2)
    release = threading.Event()
    original = engine._step
    monkeypatch.setattr(engine, "_step", lambda: (release.wait(30), original()))
    engine.start()
    stuck = Collector()
    engine.submit(EngineRequest([1, 5], SamplingParams(max_new_tokens=2, temperature=0.0), stuck))
    time.sleep(0.5)
    assert "in one step for" in (engine.health() or "")
    release.set()
    assert stuck.done.wait(30) and stuck.error is None
    assert wait_for(lambda: engine.health() is None)  # the step that emitted the last token is still ending
    engine.stop()
    assert "worker thread has stopped" in engine.health()
    with pytest.raises(EngineStoppedError, match="not running"):
        engine.submit(EngineRequest([1, 5], SamplingParams(max_new_tokens=2), lambda item: None))



OPENMP_PROBE = """
import os, sys, time
import torch, sentencepiece  # sentencepiece brings a second libgomp, under a mangled name: not the one to pause
from factories import random_model
from llamaforge.api import LLM
from llamaforge.config import ModelArgs
from llamaforge.engine import Engine

torch.set_num_threads(2)
tasks = lambda: set(os.listdir("/proc/self/task"))
llm = LLM(random_model(ModelArgs(dim=64, n_layers=1, n_heads=4, hidden_dim=128, vocab_size=64, max_seq_len=32)),
          tokenizer=None)
before = tasks()
torch.ones(1 << 24).sum()  # a parallel region: this thread now keeps a pool of OpenMP workers
pool = tasks() - before
engine = Engine(llm, max_batch_size=1).start()
time.sleep(0.2)
print(len(pool), len(pool & tasks()))
engine.stop()
"""


def test_starting_the_engine_ends_the_callers_openmp_workers() -> None:
    """libgomp stops spinning between the engine's parallel regions while another thread keeps a pool of
    workers (a small linear then costs 3-4x): the thread that starts the engine gives its pool back."""
    if libgomp() is None:
        pytest.skip("torch does not run on GNU OpenMP (libgomp.so.1) here")
    tests = Path(__file__).parent
    done = subprocess.run([sys.executable, "-c", OPENMP_PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": f"{tests}{os.pathsep}{tests.parent}"})
    assert done.returncode == 0, done.stderr
    pool, left = map(int, done.stdout.split())
    assert pool >= 1 and left == 0
