"""The continuous-batching engine without HTTP: results equal to one-at-a-time generation."""

from __future__ import annotations

import threading

import pytest

from llamaforge.api import LLM
from llamaforge.engine import Engine, EngineRequest, QueueFullError
from llamaforge.errors import GenerationError, LlamaforgeError
from llamaforge.generate import TokenEvent
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
    assert stats.prompt_tokens == sum(len(p) for p in prompts)


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
    assert engine_module.kv_cache_bytes(tiny_llm, 4, 128) == 4 * 128 * 2 * config.n_layers * config.n_kv_heads * \
        config.head_dim * 4
    monkeypatch.setattr(engine_module, "_available_bytes", lambda device: 100_000)
    with pytest.raises(LlamaforgeError, match=r"KV cache for 4 slots of 128 tokens needs .* GiB, but only .* GiB "
                                              r"is free on cpu; lower --max-batch-size or --max-context"):
        Engine(tiny_llm, max_batch_size=4)
    assert Engine(tiny_llm, max_batch_size=1, max_context=64).kv_cache_bytes == 64 * 512
