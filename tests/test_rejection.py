"""Rejection sampling (`llamaforge sample`): each prompt's best of n sampled answers by a reward function, as chat
records finetune reads; reward functions that fail are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llamaforge
from llamaforge.cli import main
from llamaforge.finetune.data import load_records
from llamaforge.finetune.rejection import RewardError, load_reward_function, sample_best
from llamaforge.sampling import SamplingParams

REWARDS = '''
import re


def exact_sum(messages, answer):
    """1 when the answer states the sum the question asks for, else 0."""
    a, b = map(int, re.findall(r"\\d+", messages[-1]["content"]))
    return float(str(a + b) in answer)


def length(messages, answer):
    return len(answer)


def broken(messages, answer):
    raise KeyError("no such field")


def words(messages, answer):
    return "high"


def nan(messages, answer):
    return float("nan")
'''


@pytest.fixture
def rewards(tmp_path: Path) -> Path:
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS)
    return path


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {a} plus {b}?"} for a, b in ((12, 30), (7, 8), (25, 17))]
    rows.append({"messages": [{"role": "user", "content": "What is 40 plus 2?"}]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_the_best_of_n_is_each_prompts_highest_scoring_answer(prompts: Path, rewards: Path) -> None:
    """Each kept answer is the highest-scoring of the n the same seeds give one at a time through generate()."""
    llm = llamaforge.load()
    reward = load_reward_function(f"{rewards}:length")
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=5)
    best = sample_best(llm, str(prompts), 3, reward, params, max_batch_size=4)
    assert len(best) == 4
    for record, row in zip(best, load_records(prompts), strict=True):
        messages = record["messages"][:-1]
        alone = [llm.chat(messages, SamplingParams(max_new_tokens=24, temperature=1.0, seed=5 + i)).text.strip()
                 for i in range(3)]
        assert record["messages"][-1] == {"role": "assistant", "content": max(alone, key=len)}
        assert record["reward"] == max(map(len, alone))
        assert messages[-1]["content"] in json.dumps(row.data)


def test_sample_command_writes_sft_data_the_trainer_reads(prompts: Path, rewards: Path, tmp_path: Path,
                                                          capsys) -> None:
    from llamaforge.finetune.data import prepare_record

    out = tmp_path / "best.jsonl"
    assert main(["sample", "--prompts", str(prompts), "--n", "4", "--reward-function", f"{rewards}:exact_sum",
                 "--out", str(out), "--max-new-tokens", "24", "--temperature", "0.8", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    records = load_records(out)
    assert summary["prompts"] == len(records) == 4 and 0 <= summary["mean_reward"] <= 1
    llm = llamaforge.load()
    for record in records:
        prepare_record(llm.tokenizer, record)  # a valid chat record for finetune
        assert record.data["reward"] in (0.0, 1.0)
    assert sum(record.data["reward"] for record in records) >= 3  # the demo model adds well


def test_pairs_are_each_prompts_best_and_worst_answer_and_train_dpo(prompts: Path, rewards: Path,
                                                                    tmp_path: Path, capsys) -> None:
    """--pairs keeps the longest and the shortest of the answers the seeds give alone, as pairs the DPO trainer
    encodes; a prompt whose answers all score alike (the sums: the demo model says them one way) gives no pair."""
    from llamaforge.finetune.preference_trainer import encode_pairs

    with prompts.open("a") as file:  # comparing one-digit numbers, its weak spot, gets answers of many lengths
        file.write("".join(json.dumps({"prompt": f"Which is smaller, {a} or {b}?"}) + "\n"
                           for a, b in ((0, 2), (1, 4), (3, 7))))
    out = tmp_path / "pairs.jsonl"
    assert main(["sample", "--prompts", str(prompts), "--n", "3", "--reward-function", f"{rewards}:length",
                 "--out", str(out), "--max-new-tokens", "24", "--temperature", "1.0", "--seed", "5", "--pairs",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    llm = llamaforge.load()
    expected = []
    for row in load_records(prompts):
        messages = [{"role": "user", "content": row.data["prompt"]}] if "prompt" in row.data else row.data["messages"]
        alone = [llm.chat(messages, SamplingParams(max_new_tokens=24, temperature=1.0, seed=5 + i)).text.strip()
                 for i in range(3)]
        if len(set(map(len, alone))) > 1:
            expected.append((messages, max(alone, key=len), min(alone, key=len)))
    records = [record.data for record in load_records(out)]
    assert summary["pairs"] == len(records) == len(expected) >= 2
    for record, (messages, longest, shortest) in zip(records, expected, strict=True):
        assert record["prompt"] == messages
        assert record["chosen"] == [{"role": "assistant", "content": longest}]
        assert record["rejected"] == [{"role": "assistant", "content": shortest}]
        assert record["score_chosen"] == len(longest) > record["score_rejected"] == len(shortest)
    rows, notes = encode_pairs(str(out), llm.tokenizer, 512, "error")
    assert len(rows) == len(records) and not notes
    assert main(["sample", "--prompts", str(prompts), "--n", "1", "--reward-function", f"{rewards}:length",
                 "--out", str(tmp_path / "one.jsonl"), "--pairs"]) == 2
    assert "--pairs needs two answers or more to compare: raise --n (got 1)" in capsys.readouterr().err


@pytest.mark.parametrize(("function", "message"), [
    ("broken", r"the reward function .*:broken raised KeyError: 'no such field' \(prompt at line 1\)"),
    ("words", r"returned 'high' for the prompt at line 1; it must return a finite number"),
    ("nan", r"returned nan for the prompt at line 1"),
])
def test_a_reward_function_that_fails_is_named_with_the_prompt(prompts: Path, rewards: Path, function: str,
                                                               message: str) -> None:
    reward = load_reward_function(f"{rewards}:{function}")
    with pytest.raises(RewardError, match=message):
        sample_best(llamaforge.load(), str(prompts), 2, reward, SamplingParams(max_new_tokens=4, seed=0))


def test_bad_reward_specs_are_refused_before_the_model_loads(rewards: Path, tmp_path: Path) -> None:
    for spec, message in ((f"{rewards}:missing", "has no function 'missing'"), ("nomodule_xyz:f", "importing"),
                          (str(rewards), "give it as module:function"), ("none.py:f", "does not exist")):
        with pytest.raises(RewardError, match=message):
            load_reward_function(spec)
    bad_prompt = tmp_path / "bad.jsonl"
    bad_prompt.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    from llamaforge.finetune.data import DataError

    with pytest.raises(DataError, match="line 1"):
        sample_best(llamaforge.load(), str(bad_prompt), 2, load_reward_function(f"{rewards}:length"),
                    SamplingParams(max_new_tokens=4, seed=0))
