"""Speculative decoding (prompt lookup, a draft model), alone and in the engine: greedy output equal to plain
decoding, sampled output distributed alike."""

from __future__ import annotations

import threading

import pytest
import torch
from factories import random_model
from test_checkpoint import STORIES_GREEDY_200

import llamaforge
from llamaforge.api import LLM
from llamaforge.config import ModelArgs
from llamaforge.engine import Engine, EngineRequest, EngineStats
from llamaforge.errors import GenerationError
from llamaforge.generate import TokenEvent, propose_ngram
from llamaforge.sampling import SamplingParams


def test_prompt_lookup_proposes_what_followed_the_latest_match() -> None:
    context = [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 3, 5, 6]
    assert propose_ngram(context, 3) == [7, 1, 2]  # "5 6" last occurred at index 5, followed by 7 1 2
    assert propose_ngram([1, 2, 3, 4], 3) == []  # the tail never occurred before
    assert propose_ngram([4, 9, 4], 5) == [9, 4]  # one-token match; the draft runs to the end of the context
    assert propose_ngram(context, 0) == []


def test_greedy_speculation_tells_stories260k_story_token_for_token(assets) -> None:
    folder = assets / "stories260K"
    llm = llamaforge.load(folder / "stories260K.bin", tokenizer=folder / "tok512.model", speculate=6)
    out = llm.generate([1], max_new_tokens=200, temperature=0.0)
    assert out.text.encode() == STORIES_GREEDY_200
    assert out.timings["accepted_tokens"] > 20 and out.timings["verify_steps"] < 190  # it did speculate


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_greedy_speculation_answers_as_plain_decoding(quantize: str | None) -> None:
    plain = llamaforge.load(quantize=quantize)
    fast = LLM(plain.model, plain.tokenizer, speculate=5)
    for question in ("What is 37 + 45?", "Spell the word 'banana'.", "Reverse the word 'racecar'.",
                     "Count the letters in 'mississippi'."):
        messages = [{"role": "user", "content": question}]
        expected = plain.chat(messages, temperature=0.0)
        got = fast.chat(messages, temperature=0.0)
        assert got.token_ids == expected.token_ids and got.text == expected.text
        assert got.finish_reason == expected.finish_reason
    # Stop strings and the token budget end a speculative run where they end a plain one.
    prompt = plain.chat_tokens([{"role": "user", "content": "Spell the word 'banana'."}])
    for options in ({"stop": ["a-n"]}, {"max_new_tokens": 7}):
        assert fast.generate(prompt, temperature=0.0, **options).text == plain.generate(prompt, temperature=0.0,
                                                                                         **options).text


def test_sampled_speculation_keeps_the_model_distribution() -> None:
    """The second token of 3000 seeded samples against its exact distribution, computed from the model.

    Every token occurs in the prompt, so prompt lookup drafts the second token each time, and the accept /
    reject rule decides it. A chi-square test with 19 degrees of freedom at p = 0.001 (critical value 43.82)
    accepts a correct rule; always accepting the draft, for one, fails it by far.
    """
    config = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=20, hidden_dim=64, max_seq_len=64)
    model = random_model(config, std=0.5)
    llm = LLM(model, None, speculate=4)
    prompt = [1, *range(3, 20), 4, 7, 3]
    params = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 3, "ignore_eos": True}  # 3: room to draft
    with torch.inference_mode():
        first = model(torch.tensor([prompt])).float()[0, -1].softmax(-1)  # p(t1)
        exact = torch.zeros(config.vocab_size)
        for t1 in range(config.vocab_size):
            second = model(torch.tensor([prompt + [t1]])).float()[0, -1].softmax(-1)
            exact += first[t1] * second  # p(t2) = sum over t1 of p(t1) p(t2 | t1)
    samples = 3000
    counts = torch.zeros(config.vocab_size)
    for seed in range(samples):
        counts[llm.generate(prompt, seed=seed, **params).token_ids[1]] += 1
    expected = exact * samples
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 43.82, (chi2, counts.tolist(), expected.tolist())


def test_speculate_must_be_in_range() -> None:
    with pytest.raises(GenerationError, match="speculate=16: draft 0 \\(off\\) to 15 tokens a step"):
        llamaforge.load(speculate=16)


def test_a_draft_model_leaves_greedy_answers_unchanged() -> None:
    """The demo model drafted for by its own int4 copy (and by itself: every draft accepted)."""
    plain = llamaforge.load()
    by_int4 = LLM(plain.model, plain.tokenizer, speculate=4, draft=llamaforge.load(quantize="int4").model)
    by_itself = LLM(plain.model, plain.tokenizer, speculate=4, draft=plain.model)
    for question in ("What is 37 + 45?", "Spell the word 'banana'.", "Which is larger, 512 or 215?"):
        messages = [{"role": "user", "content": question}]
        expected = plain.chat(messages, temperature=0.0)
        drafted = by_int4.chat(messages, temperature=0.0)
        assert drafted.token_ids == expected.token_ids and drafted.timings["acceptance_rate"] > 0.8
        mirrored = by_itself.chat(messages, temperature=0.0)
        # Every draft checked is accepted: after the first token, each step adds 4 drafts and 1 of its own, so the
        # answer's other tokens and its EOS (len(token_ids) in all) take ceil(len / 5) steps.
        assert mirrored.token_ids == expected.token_ids
        assert mirrored.timings["verify_steps"] == -(-len(expected.token_ids) // 5)


def test_sampled_speculation_with_a_draft_model_keeps_the_model_distribution() -> None:
    """As the prompt-lookup test, with another random model (same vocabulary) drafting from its own distribution."""
    config = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=20, hidden_dim=64, max_seq_len=64)
    model, drafter = random_model(config, seed=0, std=0.5), random_model(config, seed=1, std=0.5)
    llm = LLM(model, None, speculate=2, draft=drafter)
    prompt = [1, 5, 9, 3]
    with torch.inference_mode():
        first = model(torch.tensor([prompt])).float()[0, -1].softmax(-1)
        exact = sum(first[t1] * model(torch.tensor([prompt + [t1]])).float()[0, -1].softmax(-1)
                    for t1 in range(config.vocab_size))
    samples = 3000
    counts = torch.zeros(config.vocab_size)
    for seed in range(samples):
        out = llm.generate(prompt, seed=seed, temperature=1.0, top_p=1.0, max_new_tokens=3, ignore_eos=True)
        counts[out.token_ids[1]] += 1
    expected = exact * samples
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 43.82, (chi2, counts.tolist(), expected.tolist())


def test_a_draft_model_with_another_vocabulary_is_refused(tiny_model_dir) -> None:
    with pytest.raises(GenerationError, match="a draft model must share the model's tokenizer"):
        llamaforge.load(draft_model=tiny_model_dir)


# --- in the engine (the server's continuous batching) -------------------------------------------------------


def run_engine(llm: LLM, prompts: list[list[int]], params: list[SamplingParams],
               max_batch_size: int = 4) -> tuple[list[list[TokenEvent]], EngineStats]:
    """Every prompt's events from an Engine that runs them all at once (params per prompt), and its stats."""
    collected: list[list[TokenEvent]] = [[] for _ in prompts]
    finished = threading.Semaphore(0)
    engine = Engine(llm, max_batch_size=max_batch_size, max_queue=len(prompts)).start()

    def emitter(index: int):
        def emit(event) -> None:
            assert not isinstance(event, BaseException), event
            collected[index].append(event)
            if event.finish_reason:
                finished.release()
        return emit

    try:
        for index, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            engine.submit(EngineRequest(prompt, p, emitter(index)))
        for _ in prompts:
            assert finished.acquire(timeout=300), "the engine did not finish every request"
        return collected, engine.stats()
    finally:
        engine.stop()


QUESTIONS = ("What is 37 + 45?", "Spell the word 'banana'.", "Reverse the word 'racecar'.",
             "Count the letters in 'mississippi'.", "Which is larger, 512 or 215?")


@pytest.mark.parametrize("drafting", ["lookup", "draft model"])
def test_the_engine_speculates_with_plain_greedy_tokens_and_logprobs(drafting: str) -> None:
    """Five chats at once (batch 4, so requests come and go mid-run), one asking for log-probabilities: every
    request's tokens are plain greedy decoding's, its log-probabilities the plain engine's, and drafts were
    checked and kept; /metrics reports them."""
    plain = llamaforge.load()
    draft = llamaforge.load(quantize="int4").model if drafting == "draft model" else None
    fast = LLM(plain.model, plain.tokenizer, speculate=4, draft=draft)
    prompts = [plain.chat_tokens([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = [SamplingParams(temperature=0.0, max_new_tokens=40, logprobs=index == 1, top_logprobs=2 * (index == 1))
              for index in range(len(prompts))]
    expected, plain_stats = run_engine(plain, prompts, params)
    got, stats = run_engine(fast, prompts, params)
    for ours, theirs in zip(got, expected, strict=True):
        assert [e.token_id for e in ours] == [e.token_id for e in theirs]
        assert "".join(e.text for e in ours) == "".join(e.text for e in theirs)
        assert ours[-1].finish_reason == theirs[-1].finish_reason
    for ours, theirs in zip(got[1], expected[1], strict=True):
        assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert ours.top_logprobs.keys() == theirs.top_logprobs.keys()
    assert plain_stats.draft_tokens == 0 and stats.accepted_tokens > 20
    assert stats.steps < plain_stats.steps  # several tokens a step
    if drafting == "draft model":
        assert stats.accepted_tokens / stats.draft_tokens > 0.8


def test_the_engine_reports_speculation_in_metrics() -> None:
    pytest.importorskip("prometheus_client")
    from llamaforge.server.metrics import Metrics

    plain = llamaforge.load()
    fast = LLM(plain.model, plain.tokenizer, speculate=4)
    engine = Engine(fast, max_batch_size=2).start()
    try:
        done = threading.Event()
        prompt = plain.chat_tokens([{"role": "user", "content": "Spell the word 'banana'."}])
        engine.submit(EngineRequest(prompt, SamplingParams(temperature=0.0), lambda e: e.finish_reason and done.set()))
        assert done.wait(120)
        stats = engine.stats()
        text = Metrics(engine).render().decode()
    finally:
        engine.stop()
    assert stats.draft_tokens > 0
    assert f"llamaforge_spec_draft_tokens {float(stats.draft_tokens)}" in text
    assert f"llamaforge_spec_accepted_tokens {float(stats.accepted_tokens)}" in text
    assert f"llamaforge_spec_acceptance_rate {stats.accepted_tokens / stats.draft_tokens}" in text


def test_sampled_speculation_in_the_engine_keeps_the_model_distribution() -> None:
    """The prompt-lookup chi-square test, through the engine: 2000 seeded requests, 8 running at a time."""
    config = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=20, hidden_dim=64, max_seq_len=64)
    model = random_model(config, std=0.5)
    prompt = [1, *range(3, 20), 4, 7, 3]
    with torch.inference_mode():
        first = model(torch.tensor([prompt])).float()[0, -1].softmax(-1)
        exact = sum(first[t1] * model(torch.tensor([prompt + [t1]])).float()[0, -1].softmax(-1)
                    for t1 in range(config.vocab_size))
    samples = 2000
    params = [SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=3, ignore_eos=True, seed=seed)
              for seed in range(samples)]
    events, stats = run_engine(LLM(model, None, speculate=4), [prompt] * samples, params, max_batch_size=8)
    assert stats.draft_tokens > 0.9 * samples  # the second token was drafted (unless the first is 0 or 2)
    counts = torch.zeros(config.vocab_size)
    for row in events:
        counts[row[1].token_id] += 1
    expected = exact * samples
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 43.82, (chi2, counts.tolist(), expected.tolist())


def test_serve_takes_the_speculation_flags() -> None:
    from llamaforge.cli import build_parser

    args = build_parser().parse_args(["serve", "--speculate", "3", "--draft-model", "small"])
    assert (args.speculate, args.draft_model) == (3, "small")
