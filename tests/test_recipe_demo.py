"""The demo-model recipe: its problems are right and held out, and every stage runs (smoke mode)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo"
sys.path.insert(0, str(RECIPE))

from skills import EVALUATED, SKILLS, held_out, training  # noqa: E402


def test_answers_are_correct() -> None:
    import random

    rng = random.Random(5)
    counts = []
    for _ in range(200):
        question, answer, key = SKILLS["addition"](rng)
        assert answer == f"{key[0]} + {key[1]} = {key[0] + key[1]}."
        question, answer, (w,) = SKILLS["reverse"](rng)
        assert answer == f"'{w}' reversed is '{w[::-1]}'." and w in question
        question, answer, (w, letter) = SKILLS["count"](rng)
        assert f" {w.count(letter)} time" in answer and f"'{w}'" in question and f"'{letter}'" in question
        counts.append(w.count(letter))
        question, answer, (big, n) = SKILLS["convert"](rng)
        assert answer.startswith(f"{n} {big} is ")
    assert all(counts.count(n) > 30 for n in range(4))  # counts 0-3 equally often, not mostly 1


def test_evaluation_problems_never_appear_in_training() -> None:
    evaluation = held_out(1, 50)
    train = training(0, 2000, evaluation)
    assert {row["skill"] for row in evaluation} == set(EVALUATED)
    seen = {row["question"] for row in train}
    assert not seen & {row["question"] for row in evaluation}
    # Not only the same phrasing: the same problem in another phrasing is held out too.
    reversed_words = {row["answer"] for row in train if row["skill"] == "reverse"}
    assert not reversed_words & {row["answer"] for row in evaluation if row["skill"] == "reverse"}
    assert training(0, 2000, evaluation) == train  # seeded


@pytest.mark.slow
def test_recipe_runs_end_to_end_in_smoke_mode(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(RECIPE / "run.py"), "--out", str(tmp_path), "--smoke"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["accuracy"]) == {*EVALUATED, "addition 2-digit", "subtraction 2-digit"}
    assert (tmp_path / "demo" / "test.jsonl").is_file()  # the held-out problems, in `eval --data-dir` layout
    assert all(0.0 <= value <= 1.0 for value in report["accuracy"].values())
    import llamaforge

    llm = llamaforge.load(report["model"])
    tokenizer = llm.tokenizer
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert [tokenizer.id_to_piece(i) for i in tokenizer.encode("4096")][-4:] == ["4", "0", "9", "6"]  # digits split
    assert tokenizer.decode(tokenizer.encode("🦙")) == "🦙"  # byte fallback
    # Words of the problems' wording are one piece each; anything else is spelt letter by letter.
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode("Reverse the word 'acunefo'.")]
    assert pieces == ["▁Reverse", "▁the", "▁word", "▁", "'", *"acunefo", "'", "."]
    assert [tokenizer.id_to_piece(i) for i in llm.chat_tokens([{"role": "user", "content": "What"}])] == [
        "<s>", "▁[INST]", "▁What", "▁[/INST]"]
    manifest = json.loads((tmp_path / "chat" / "llamaforge_manifest.json").read_text())
    assert manifest["method"] == "full" and manifest["base_model"].endswith("pretrain/model")
