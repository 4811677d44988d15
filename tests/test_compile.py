"""Compiled decode: the same tokens as eager decoding, in generate and in the engine, compile time reported."""

from __future__ import annotations

import pytest
from factories import engine_tokens

import llamaforge
from llamaforge.generate import Decoder
from llamaforge.sampling import SamplingParams

QUESTIONS = ["What is 37 + 45?", "Spell the word 'cat'.", "Reverse the word 'llama'."]


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_compiled_decode_gives_eager_tokens(quantize: str | None) -> None:
    eager = llamaforge.load(quantize=quantize)
    compiled = llamaforge.load(quantize=quantize, compile=True)
    for llm in (eager, compiled):  # the compiled graph is the path where the fused decode layers do not run
        llm.model.fused_decode = None
    prompts = [eager.chat_tokens([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(max_new_tokens=40, temperature=0.0)  # to EOS: past it a model is off its data
    expected = eager.generate(prompts, params=params)
    first = compiled.generate(prompts, params=params)  # a batch of 3: compiles
    assert [r.token_ids for r in first] == [r.token_ids for r in expected]
    assert first[0].timings["compile_s"] > 0
    again = compiled.generate(prompts[0], params=params)  # batch 1, another shape: may compile again
    assert again.token_ids == expected[0].token_ids
    # Sampling draws from the same distribution with the same generator: the same tokens too.
    sampled = SamplingParams(max_new_tokens=30, temperature=0.8, top_p=0.9, seed=7)
    assert compiled.generate(prompts[1], params=sampled).token_ids == eager.generate(prompts[1],
                                                                                     params=sampled).token_ids
    assert Decoder(compiled.model, True).compiled is Decoder(eager.model, True).compiled  # one compiled function


@pytest.mark.slow
def test_the_engine_decodes_compiled_with_eager_tokens() -> None:
    llm, eager = llamaforge.load(quantize="int8", compile=True), llamaforge.load(quantize="int8")
    llm.model.fused_decode = eager.model.fused_decode = None  # as above
    prompts = [llm.chat_tokens([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    expected = [r.token_ids for r in eager.generate(prompts, params=params)]
    results = engine_tokens(llm, prompts, params, max_batch_size=2, prefill_chunk=512)
    assert results == expected
