"""Prompt-lookup speculative decoding: greedy output equal to plain decoding, sampled output distributed alike."""

from __future__ import annotations

import pytest
import torch
from factories import random_model
from test_checkpoint import STORIES_GREEDY_200

import llamaforge
from llamaforge.api import LLM
from llamaforge.config import ModelArgs
from llamaforge.errors import GenerationError
from llamaforge.generate import propose_ngram


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
