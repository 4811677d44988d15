"""Structured output: answers held to a JSON schema, any JSON object or a regular expression, through real clients."""

from __future__ import annotations

import json
import re
from typing import Literal

import pytest
import torch

pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

from llamaforge.api import LLM  # noqa: E402
from llamaforge.engine import Engine  # noqa: E402
from llamaforge.sampling import SamplingParams  # noqa: E402
from llamaforge.structured import Constraint, json_schema_grammar, regex_grammar  # noqa: E402


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    kind: Literal["llama", "alpaca", "vicuna"]
    age: int = pydantic.Field(ge=0, le=40)


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="none")


def test_parse_returns_a_valid_pydantic_object_every_time(client) -> None:
    """The openai client's `parse` sends the model's strict JSON schema; every sampled answer validates."""
    messages = [{"role": "user", "content": "Describe a pet as JSON."}]
    for seed in range(12):
        out = client.chat.completions.parse(model="tiny", messages=messages, response_format=Pet, max_tokens=60,
                                            temperature=1.0, seed=seed)
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Pet), choice.message.content


def test_json_object_mode_answers_a_json_object(client) -> None:
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                         response_format={"type": "json_object"}, max_tokens=80, temperature=0.7,
                                         seed=1, n=3)
    for choice in out.choices:
        if choice.finish_reason == "stop":  # an unbounded object may also run out of tokens
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.message.content.startswith("{")


def test_tgi_grammar_regex_and_json(live_server) -> None:
    from huggingface_hub import InferenceClient

    hub = InferenceClient(live_server.url)
    for seed in range(5):
        text = hub.text_generation("Pick a number:", max_new_tokens=10, do_sample=True, seed=seed,
                                   grammar={"type": "regex", "value": "[0-9]{3}-(yes|no)"})
        assert re.fullmatch("[0-9]{3}-(yes|no)", text), text
    # Closed to other keys (as OpenAI's strict schemas are), so the object ends within the token budget.
    schema = {**Pet.model_json_schema(), "additionalProperties": False}
    text = hub.text_generation("A pet:", max_new_tokens=60, grammar={"type": "json", "value": schema})
    Pet.model_validate_json(text)


def test_every_token_the_mask_allows_fits_the_grammar(tiny_llm: LLM) -> None:
    """Each allowed token is accepted by a copy of the matcher (first three steps); tokens the grammar refuses are
    masked. (The mask may leave out some tokens the grammar would take: byte-fallback spellings of text that has
    its own tokens, which a model does not produce.)"""
    tokenizer = tiny_llm.tokenizer
    constraint = Constraint(tokenizer, regex_grammar("(ab|cd)[0-9]+"))
    for _ in range(3):
        allowed = constraint.allowed()
        fits = torch.tensor([constraint.matcher.deep_copy().consume_token(t) for t in range(tokenizer.vocab_size)])
        assert allowed.any() and not (allowed & ~fits).any()
        assert (~fits).sum() > tokenizer.vocab_size // 2  # most of the vocabulary is refused, and masked
        constraint.accept(int(allowed.nonzero()[0]))


def test_constrained_requests_in_the_engine_with_speculation_and_neighbours(tiny_llm: LLM) -> None:
    """With speculation on (a draft model: the model itself), constrained requests still follow their grammar (no
    drafts for them), and unconstrained neighbours in the same batch answer as they do alone."""
    import threading

    from llamaforge.engine import EngineRequest

    llm = LLM(tiny_llm.model, tiny_llm.tokenizer, speculate=3, draft=tiny_llm.model)
    engine = Engine(llm, max_batch_size=4).start()
    grammar = json_schema_grammar({**Pet.model_json_schema(), "additionalProperties": False})
    params = SamplingParams(max_new_tokens=60, temperature=0.9, seed=4)
    plain = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    prompt = tiny_llm.tokenizer.encode("a a a a a a", bos=True)
    results: dict[int, list[int]] = {i: [] for i in range(4)}
    done = threading.Semaphore(0)

    def emitter(index: int):
        def emit(event) -> None:
            assert not isinstance(event, BaseException), event
            if not event.eos:
                results[index].append(event.token_id)
            if event.finish_reason:
                done.release()
        return emit

    try:
        for index in range(4):
            constraint = Constraint(tiny_llm.tokenizer, grammar) if index % 2 == 0 else None
            engine.submit(EngineRequest(prompt, params if constraint else plain, emitter(index), constraint=constraint))
        for _ in range(4):
            assert done.acquire(timeout=120)
    finally:
        engine.stop()
    for index in (0, 2):
        Pet.model_validate_json(tiny_llm.tokenizer.decode(results[index]))
    alone = tiny_llm.generate(prompt, params=plain).token_ids
    assert results[1] == results[3] == alone
    # Only the two unconstrained requests drafted: 12 tokens each, drafts of up to 3 for all but their first.
    assert 0 < engine.stats().draft_tokens <= 2 * 11


def test_a_token_the_grammar_forbids_is_refused_with_the_reason(tiny_llm: LLM) -> None:
    from llamaforge.structured import GrammarError

    constraint = Constraint(tiny_llm.tokenizer, regex_grammar("x"))
    forbidden = int((~constraint.allowed()).nonzero()[0])
    with pytest.raises(GrammarError, match=f"token {forbidden} does not fit the grammar"):
        constraint.accept(forbidden)
