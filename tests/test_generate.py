"""Generation: batching, sampling, stop strings, context limits, log-probabilities, streaming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import random_model

from llamaforge.api import LLM
from llamaforge.config import ModelArgs
from llamaforge.errors import GenerationError
from llamaforge.generate import StopStringMatcher
from llamaforge.sampling import SamplingParams, filter_top_k_top_p
from llamaforge.tokenizer import Tokenizer

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def llm(tiny_config: ModelArgs, tiny_tokenizer_path: Path) -> LLM:
    return LLM(random_model(tiny_config), Tokenizer(tiny_tokenizer_path))


def test_batch_of_different_lengths_equals_one_at_a_time(llm: LLM) -> None:
    prompts = ["Once upon a time", "Llamas", "The quick brown fox jumps over the lazy dog again and again", "1"]
    batched = llm.generate(prompts, max_new_tokens=12, **GREEDY)
    for prompt, result in zip(prompts, batched, strict=True):
        alone = llm.generate(prompt, max_new_tokens=12, **GREEDY)
        assert result.token_ids == alone.token_ids
        assert result.text == alone.text


def test_token_id_prompt_is_used_as_given(llm: LLM) -> None:
    ids = llm.tokenizer.encode("Once upon", bos=True)
    assert llm.generate(ids, max_new_tokens=5, **GREEDY).token_ids == llm.generate(
        "Once upon", max_new_tokens=5, **GREEDY).token_ids
    without_bos = llm.generate(ids[1:], max_new_tokens=5, **GREEDY)
    assert without_bos.prompt_tokens == len(ids) - 1


def test_text_continues_the_prompt(llm: LLM) -> None:
    out = llm.generate("Once upon", max_new_tokens=10, **GREEDY)
    tokenizer = llm.tokenizer
    prompt_ids = tokenizer.encode("Once upon", bos=True)
    assert tokenizer.decode(prompt_ids) + out.text == tokenizer.decode(prompt_ids + out.token_ids)


def test_stream_adds_up_to_generate(llm: LLM) -> None:
    for params in [SamplingParams(max_new_tokens=30, temperature=0.0),
                   SamplingParams(max_new_tokens=30, temperature=1.0, seed=7)]:
        assert "".join(llm.stream("Llamas live", params=params)) == llm.generate("Llamas live", params=params).text


def test_seed_makes_sampling_reproducible(llm: LLM) -> None:
    first = llm.generate("Once", max_new_tokens=20, temperature=1.0, top_p=1.0, seed=123)
    again = llm.generate("Once", max_new_tokens=20, temperature=1.0, top_p=1.0, seed=123)
    other = llm.generate("Once", max_new_tokens=20, temperature=1.0, top_p=1.0, seed=124)
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


def test_seeded_sampling_does_not_depend_on_the_batch(llm: LLM) -> None:
    alone = llm.generate("Once", max_new_tokens=15, temperature=0.9, seed=5)
    batched = llm.generate(["Once", "Something much longer than the first prompt"], max_new_tokens=15,
                           temperature=0.9, seed=5)
    assert batched[0].token_ids == alone.token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(llm: LLM) -> None:
    greedy = llm.generate("Llamas", max_new_tokens=15, **GREEDY).token_ids
    assert llm.generate("Llamas", max_new_tokens=15, temperature=1.5, top_k=1, seed=1).token_ids == greedy
    assert llm.generate("Llamas", max_new_tokens=15, temperature=1.5, top_p=1e-6, seed=1).token_ids == greedy


def test_a_top_k_past_the_vocabulary_cuts_nothing(llm: LLM) -> None:
    huge = llm.generate("Once", max_new_tokens=8, temperature=1.0, top_k=1 << 64, seed=5)
    assert huge.token_ids == llm.generate("Once", max_new_tokens=8, temperature=1.0, seed=5).token_ids


def test_top_k_top_p_filter_keeps_the_right_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    kept = filter_top_k_top_p(logits, top_k=torch.tensor([0, 3]), top_p=torch.tensor([0.7, 1.0])).isfinite()
    # Row 0: 0.5 < 0.7, so the second token is needed; row 1: top-3.
    assert kept.tolist() == [[True, True, False, False], [True, True, True, False]]


def test_repetition_penalty_discourages_repeats(llm: LLM) -> None:
    plain = llm.generate("a a a a", max_new_tokens=30, **GREEDY).token_ids
    penalised = llm.generate("a a a a", max_new_tokens=30, repetition_penalty=5.0, **GREEDY).token_ids
    assert len(set(penalised)) > len(set(plain))


def test_presence_and_frequency_penalties_follow_openais_formula(llm: LLM) -> None:
    """Greedy with penalties picks, at every step, the argmax of logit - frequency * count - presence * (count > 0)
    over the tokens generated so far (the prompt's do not count)."""
    presence, frequency = 0.7, 1.3
    prompt = llm.tokenizer.encode("a a a a", bos=True)
    out = llm.generate(prompt, max_new_tokens=20, presence_penalty=presence, frequency_penalty=frequency, **GREEDY)
    counts = torch.zeros(llm.config.vocab_size)
    for step, token in enumerate(out.token_ids):
        with torch.no_grad():
            logits = llm.model(torch.tensor([prompt + out.token_ids[:step]]))[0, -1].float()
        assert token == int((logits - frequency * counts - presence * (counts > 0)).argmax())
        counts[token] += 1
    plain = llm.generate(prompt, max_new_tokens=20, **GREEDY).token_ids
    assert len(set(out.token_ids)) > len(set(plain))


def test_logit_bias_forces_and_bans_tokens(llm: LLM) -> None:
    plain = llm.generate("Llamas", max_new_tokens=5, **GREEDY).token_ids
    forced = llm.generate("Llamas", max_new_tokens=5, logit_bias={77: 100.0}, **GREEDY).token_ids
    assert forced == [77] * 5
    banned = llm.generate("Llamas", max_new_tokens=5, logit_bias={plain[0]: -100.0}, **GREEDY).token_ids
    assert banned[0] != plain[0]
    sampled = llm.generate("Llamas", max_new_tokens=20, logit_bias={plain[0]: -100.0}, temperature=1.0, seed=3)
    assert plain[0] not in sampled.token_ids


def test_logprobs_are_the_models_log_softmax(llm: LLM) -> None:
    out = llm.generate("Llamas", max_new_tokens=6, logprobs=True, top_logprobs=3, **GREEDY)
    prompt = llm.tokenizer.encode("Llamas", bos=True)
    with torch.no_grad():
        full = llm.model(torch.tensor([prompt + out.token_ids]))[0].log_softmax(-1)
    for step, token in enumerate(out.token_ids):
        row = full[len(prompt) - 1 + step]
        assert out.logprobs[step] == pytest.approx(row[token].item(), abs=1e-4)
        top = row.topk(3)
        assert list(out.top_logprobs[step]) == top.indices.tolist()
        assert token == top.indices[0].item()  # greedy picks the most likely


def test_eos_stops_and_is_not_returned(tiny_config: ModelArgs) -> None:
    model = random_model(tiny_config)
    probe = LLM(model, None).generate([1, 5, 9], max_new_tokens=8, **GREEDY)
    model.config = tiny_config.replace(eos_token_id=probe.token_ids[3])  # make the 4th token "EOS"
    out = LLM(model, None).generate([1, 5, 9], max_new_tokens=8, **GREEDY)
    assert out.finish_reason == "stop"
    assert out.token_ids == probe.token_ids[:3]
    assert LLM(model, None).generate([1, 5, 9], max_new_tokens=8, ignore_eos=True, **GREEDY).token_ids == \
        probe.token_ids


def test_length_finish(llm: LLM) -> None:
    out = llm.generate("Once", max_new_tokens=4, ignore_eos=True, **GREEDY)
    assert out.finish_reason == "length" and len(out.token_ids) == 4


def test_stop_string_cuts_and_is_never_emitted(llm: LLM) -> None:
    reference = llm.generate("Once", max_new_tokens=40, ignore_eos=True, **GREEDY).text
    assert len(reference) > 12
    stop = reference[8:11]  # text the model will produce, likely spread over token boundaries
    out = llm.generate("Once", max_new_tokens=40, stop=[stop], **GREEDY)
    assert out.finish_reason == "stop"
    assert out.text == reference[:reference.index(stop)]
    deltas = list(llm.stream("Once", max_new_tokens=40, stop=[stop], **GREEDY))
    assert "".join(deltas) == out.text


def test_stop_matcher_holds_back_possible_starts() -> None:
    matcher = StopStringMatcher(["</answer>", "STOP"])
    assert matcher.feed("Hello </") == ("Hello ", False)
    assert matcher.feed("ans") == ("", False)
    assert matcher.feed("wer") == ("", False)
    assert matcher.feed("x> ST") == ("</answerx> ", False)
    assert matcher.feed("OP and more") == ("", True)
    assert StopStringMatcher(["ab"]).feed("xxabyyab") == ("xx", True)


class NaiveStopMatcher:
    """The obvious matcher (quadratic in the stop strings' lengths): the reference for StopStringMatcher."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.pending = stops, ""

    def feed(self, delta: str) -> tuple[str, bool]:
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            text, self.pending = self.pending[:min(hits)], ""
            return text, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, False


def test_stop_matcher_equals_the_naive_matcher_on_random_text() -> None:
    import random

    rng = random.Random(0)
    for _ in range(2000):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        ours, naive = StopStringMatcher(stops), NaiveStopMatcher(stops)
        for _ in range(rng.randint(1, 12)):
            delta = "".join(rng.choices("abc", k=rng.randint(0, 4)))
            expected = naive.feed(delta)
            assert ours.feed(delta) == expected, (stops, delta)
            if expected[1]:
                break


def test_stop_matcher_work_does_not_grow_with_the_stop_length() -> None:
    # 4 stop strings of 250k characters (1 MB, what a request body may hold), each a near-miss of the text:
    # the naive matcher compares every prefix on every token (about 10^11 character steps for this feed).
    long_stops = ["a" * 249_999 + tail for tail in "bcde"]
    matcher = StopStringMatcher(long_stops)
    for _ in range(300):
        assert matcher.feed("aaa") == ("", False)  # 900 a's: each may still become a stop string
    assert matcher.feed("x") == ("a" * 900 + "x", False)
    assert matcher.feed("a" * 249_999 + "d") == ("", True)


def test_prompt_too_long_names_both_numbers(llm: LLM) -> None:
    prompt = list(range(3, 100))  # 97 tokens, context is 128
    with pytest.raises(GenerationError, match=r"prompt has 97 tokens and max_new_tokens is 40: 137 .* context of 128"):
        llm.generate(prompt, max_new_tokens=40)
    out = llm.generate([1] + prompt, max_new_tokens=40, truncate=True, **GREEDY)
    assert out.prompt_tokens == 88 and len(out.token_ids) <= 40
    assert out.token_ids == llm.generate([1] + prompt[-87:], max_new_tokens=40, **GREEDY).token_ids


@pytest.mark.parametrize(("options", "message"), [
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
    ({"temperature": float("nan")}, "temperature must be >= 0"),
    ({"stop": [""]}, "stop strings must be non-empty"),
    ({"seed": 1 << 64}, r"seed must be an integer in \[-9223372036854775808, 18446744073709551615\]"),
    ({"seed": -(1 << 63) - 1}, "seed must be an integer in"),
    ({"bogus": 1}, "unknown generation option"),
    ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
    ({"frequency_penalty": float("inf")}, r"frequency_penalty must be in \[-2, 2\]"),
    ({"logit_bias": {5: 150}}, r"logit_bias maps token ids \(>= 0\) to biases in \[-100, 100\]"),
    ({"logit_bias": {-1: 1}}, "logit_bias maps token ids"),
    ({"logit_bias": {400: 1}, "max_new_tokens": 4}, r"logit_bias names token ids \[400\] past the vocabulary"),
])
def test_invalid_sampling_values_are_named(llm: LLM, options: dict, message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        llm.generate("hi", **options)


def test_empty_prompt_is_refused(llm: LLM) -> None:
    with pytest.raises(GenerationError, match="prompt is empty"):
        llm.generate([])


def test_chat_uses_the_chat_format(llm: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = llm.chat(messages, max_new_tokens=10, **GREEDY)
    assert out.prompt_tokens == len(llm.chat_tokens(messages))
    assert out.text == llm.tokenizer.decode(out.token_ids)  # Meta's decode of the answer alone
    assert "".join(llm.stream_chat(messages, max_new_tokens=10, **GREEDY)) == out.text
