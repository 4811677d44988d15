"""The DPO example on the demo model (recipes/demo/dpo.py): its held-out problems are held out, its reward is right,
and every stage (eval, sample --pairs, finetune --objective dpo, merge, eval again) runs in smoke mode."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo"
sys.path.insert(0, str(RECIPE))

from dpo import DIGIT_MIXES, make_problems  # noqa: E402
from rewards import compare  # noqa: E402


def numbers(question: str) -> tuple[int, int]:
    a, b = map(int, re.findall(r"\d+", question))
    return a, b


def test_held_out_problems_share_no_pair_of_numbers_with_the_prompts(tmp_path: Path) -> None:
    prompts, folders = make_problems(tmp_path, 1000, 400)
    trained = [json.loads(line)["prompt"] for line in prompts.open()]
    sets = {name: [json.loads(line) for line in (folder / "demo" / "test.jsonl").open()]
            for name, folder in folders.items()}
    assert all(max(row["key"]) < 100 for row in sets["small"]) and all(max(row["key"]) >= 100 for row in sets["large"])
    held_out = sets["small"] + sets["large"]
    assert len(set(trained)) == len(trained) and len({row["question"] for row in held_out}) == len(held_out)
    pairs = {frozenset(numbers(question)) for question in trained}
    assert not pairs & {frozenset(row["key"]) for row in held_out}  # in either order
    mixes = {tuple(len(str(n)) for n in row["key"]) for row in held_out}
    assert mixes == set(DIGIT_MIXES)
    assert sum(1 for row in held_out if max(row["key"]) < 10) == 400 * DIGIT_MIXES[(1, 1)] // 100
    for row in held_out:  # the rows eval's demo_compare task reads
        assert row["skill"] == "compare" and row["variant"] == "single" and row["history"] == []
        assert numbers(row["question"]) == tuple(row["key"])


def test_the_reward_accepts_exactly_the_right_answer() -> None:
    ask = [{"role": "user", "content": "Which number is less: 7 or 30?"}]
    assert compare(ask, "7 < 30, so 7 is smaller.") == 1.0
    assert compare(ask, " 7 < 30, so 7 is smaller.") == 1.0
    for wrong in ("7 > 30, so 30 is smaller.", "7 < 30, so 30 is smaller.", "7 < 30, so 7 is7 is smaller.",
                  "7 < 30, so 7 is larger.", ""):
        assert compare(ask, wrong) == 0.0, wrong
    assert compare([{"role": "user", "content": "which is larger, 512 or 98"}], "512 > 98, so 512 is larger.") == 1.0
    assert compare([{"role": "user", "content": "Which number is bigger: 3 or 4?"}], "3 < 4, so 4 is larger.") == 1.0


@pytest.mark.slow
def test_the_dpo_example_runs_end_to_end_in_smoke_mode(tmp_path: Path) -> None:
    """Two rounds on a few problems: each round's pairs are a right and a wrong answer of the model's own, by the
    reward; the summary's accuracies are eval's; the second round samples from the first round's merged model."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(RECIPE / "dpo.py"), "--out", str(out), "--smoke", "--rounds", "2"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for name in ("small", "large"):
        before = json.loads((out / f"compare-{name}.json").read_text())["results"]
        assert summary["before"][name] == before["demo_compare"]["exact_match"]
        assert before["demo_compare"]["samples"] == summary["held_out"][name] > 0
    assert len(summary["rounds"]) == 2
    for number, result in enumerate(summary["rounds"], start=1):
        here = out / f"round{number}"
        pairs = [json.loads(line) for line in (here / "pairs.jsonl").open()]
        assert len(pairs) == result["pairs"] > 0
        for pair in pairs:
            assert compare(pair["prompt"], pair["chosen"][0]["content"]) == pair["score_chosen"] == 1.0
            assert compare(pair["prompt"], pair["rejected"][0]["content"]) == pair["score_rejected"] == 0.0
        after = json.loads((here / "compare-small.json").read_text())["results"]
        assert result["after"]["small"] == after["demo_compare"]["exact_match"]
        assert 0.0 <= result["after"]["skills"] <= 1.0 and "loss" in result["dpo"]
        assert (here / "run" / "adapter_model.safetensors").is_file() and (here / "compare.png").is_file()
    assert (out / "round1" / "merged" / "config.json").is_file()
    manifest = json.loads((out / "round2" / "run" / "llamaforge_manifest.json").read_text())
    assert manifest["base_model"].endswith("merged")
