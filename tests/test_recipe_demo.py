"""The demo-model recipe: its problems are right and held out, its dialogs too, and every stage runs (smoke mode)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo"
sys.path.insert(0, str(RECIPE))

from run import CHAT_LEN, readable, train_tokenizer, write_dialogs  # noqa: E402
from skills import (  # noqa: E402
    CAPABILITY,
    EVALUATED,
    HELLO,
    SELF,
    SKILLS,
    UNITS,
    held_out,
    rephrase,
    training,
)

from llamaforge.eval.tasks import DEMO_TASKS  # noqa: E402


def solve(question: str) -> str | None:
    """The answer to a question in any of the recipe's phrasings, worked out here on its own (None: not a skill's)."""
    q = question.lower().replace("what's", "what is")
    numbers = [int(n) for n in re.findall(r"\d+", q)]
    words = re.findall(r"'([a-z]+)'", q)
    if m := re.fullmatch(r"(?:what is |compute )?(\d+) ?(\+|-|plus|minus) ?(\d+)(?: ?= ?)?[?.]?", q):
        a, b = int(m[1]), int(m[3])
        if max(a, b) <= 99:
            return f"{a} + {b} = {a + b}." if m[2] in ("+", "plus") else f"{a} - {b} = {a - b}."
    if m := re.fullmatch(r"(?:add (\d+) and (\d+)|subtract (\d+) from (\d+))\.?", q):
        if m[1] and max(numbers) <= 99:
            return f"{m[1]} + {m[2]} = {int(m[1]) + int(m[2])}."
        if m[3] and max(numbers) <= 99:
            return f"{m[4]} - {m[3]} = {int(m[4]) - int(m[3])}."
    if q.startswith("which") and max(numbers) <= 999:
        a, b = numbers
        which = "larger" if "larger" in q or "bigger" in q else "smaller"
        return f"{a} {'>' if a > b else '<'} {b}, so {(max if which == 'larger' else min)(a, b)} is {which}."
    for big, small, factor in UNITS:
        if re.fullmatch(rf"(how many {small} are in \d+ {big}|convert \d+ {big} to {small})[?.]?", q):
            return f"{numbers[0]} {big} is {numbers[0] * factor} {small}."
    if "revers" in q or "backwards" in q:
        return f"'{words[0]}' reversed is '{words[0][::-1]}'."
    if q.startswith("spell") or q.startswith("how do you spell"):
        return "-".join(words[0])
    if "letter" in q and len(words) == 2:
        letter, word = words
        running = ", ".join(f"{c} {word[:i + 1].count(letter)}" for i, c in enumerate(word))
        n = word.count(letter)
        return f"{running}. The letter '{letter}' appears {n} time{'s' if n != 1 else ''} in '{word}'."
    return None


def test_answers_are_correct_in_every_phrasing() -> None:
    rng = random.Random(5)
    counts, digits, one_digit = [], set(), []
    for _ in range(300):
        for name in ("addition", "subtraction", "compare", "convert", "reverse", "spell", "count"):
            question, answer, key = SKILLS[name](rng)
            assert solve(question) == answer, question
            assert solve(rephrase(rng, question)) == answer, question
            if name == "count":
                counts.append(key[0].count(key[1]))
            if name == "addition":
                digits.add(tuple(len(str(n)) for n in key))
                one_digit += [n for n in key if n < 10]
        question, answer, _ = SKILLS["out_of_scope"](rng)
        assert answer == CAPABILITY and solve(question) is None, question
    assert all(counts.count(n) > 50 for n in range(4))  # counts 0-3 equally often, not mostly 1
    assert digits == {(1, 1), (1, 2), (2, 1), (2, 2)}  # one-digit numbers, first or second, and both
    assert 0.1 < one_digit.count(0) / len(one_digit) < 0.3 and set(one_digit) == set(range(10))  # 0 a fifth
    assert {rephrase(random.Random(i), "What is 47 + 38?") for i in range(200)} >= {
        "What is 47+38?", "What is 47 +38?", "what's 47 + 38?", "What is 47 + 38", "what is 47+38"}


def test_evaluation_problems_never_appear_in_training() -> None:
    evaluation = held_out(1, 50)
    train = training(0, 4000, evaluation)
    assert {(row["skill"], row["variant"]) for row in evaluation} == {
        (skill, variant) for skill in EVALUATED for variant in ("single", "multiturn", "phrasing")}
    # Not only the same phrasing: the same problem in any phrasing is held out, in every variant.
    assert not {(row["skill"], tuple(row["key"])) for row in train} & {
        (row["skill"], tuple(row["key"])) for row in evaluation}
    assert not {row["question"] for row in train} & {row["question"] for row in evaluation}
    reversed_words = {row["answer"] for row in train if row["skill"] == "reverse"}
    assert not reversed_words & {row["answer"] for row in evaluation if row["skill"] == "reverse"}
    assert training(0, 4000, evaluation) == train  # seeded
    for row in evaluation:
        assert row["answer"] == (CAPABILITY if row["skill"] == "out_of_scope" else solve(row["question"])), row


def answered(messages: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) of each exchange of a dialog, after its system prompt."""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
    return [(user["content"], assistant["content"]) for user, assistant in zip(turns[::2], turns[1::2], strict=True)]


def right(question: str, answer: str) -> bool:
    return answer in (solve(question), CAPABILITY, HELLO, SELF)


def test_multi_turn_problems_ask_the_last_question_after_correct_exchanges() -> None:
    dialogs = [row for row in held_out(1, 50) if row["variant"] == "multiturn"]
    assert {sum(m["role"] == "user" for m in row["history"]) for row in dialogs} == {1, 2, 3, 4, 5}
    assert any(row["history"][0]["role"] == "system" for row in dialogs)
    for row in dialogs:
        earlier = answered(row["history"])
        assert all(right(question, answer) for question, answer in earlier), earlier
    assert {solve(question) is None for row in dialogs for question, _ in answered(row["history"])} == {True, False}


def test_training_dialogs_fill_their_rows_with_correct_exchanges(tmp_path: Path) -> None:
    from llamaforge.finetune.data import encode_chat
    from llamaforge.tokenizer import Tokenizer

    problems = training(0, 3000, held_out(1, 5))
    tokenizer_path, _ = train_tokenizer(tmp_path, problems)
    chat = write_dialogs(tmp_path, problems, tokenizer_path)
    tokenizer = Tokenizer(tokenizer_path)
    dialogs = [json.loads(line)["messages"] for line in chat.read_text().splitlines()]
    exchanges = [exchange for messages in dialogs for exchange in answered(messages)]
    assert len(exchanges) > 0.95 * len(problems)  # only the few left over at the end are not used
    assert all(right(question, answer) for question, answer in exchanges)
    assert len({len(answered(messages)) for messages in dialogs}) > 3  # dialogs of several lengths
    # Each dialog is just longer than a row, so the trainer's rows are full: no padding, the plain causal kernel.
    for messages in dialogs:
        assert CHAT_LEN < len(encode_chat(tokenizer, messages).input_ids) < CHAT_LEN + 100
    # No answer ends with a space: Meta's format puts one before EOS, and this tokenizer drops it.
    example = encode_chat(tokenizer, dialogs[0][-2:])
    assert tokenizer.id_to_piece(example.input_ids[-2]) != "▁" and example.labels[-1] == tokenizer.eos_id


@pytest.mark.slow
def test_recipe_runs_end_to_end_in_smoke_mode(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(RECIPE / "run.py"), "--out", str(tmp_path), "--smoke"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["accuracy"]) == {readable(task) for task in DEMO_TASKS}
    assert {"addition multi-turn", "count phrasing", "out_of_scope", "subtraction 1-digit"} <= set(report["accuracy"])
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
    assert [tokenizer.id_to_piece(i) for i in tokenizer.encode("what's 47+38")] == [
        "▁what", "'", "s", "▁", "4", "7", "+", "3", "8"]
    assert [tokenizer.id_to_piece(i) for i in llm.chat_tokens([{"role": "user", "content": "What"}])] == [
        "<s>", "▁[INST]", "▁What", "▁[/INST]"]
    # The space Meta's format puts after an answer is no piece: the model never learns to say it.
    assert tokenizer.encode("[INST] Hi [/INST] 2 + 3 = 5. ") == tokenizer.encode("[INST] Hi [/INST] 2 + 3 = 5.")
    manifest = json.loads((tmp_path / "chat" / "llamaforge_manifest.json").read_text())
    assert manifest["method"] == "full" and manifest["base_model"] == f"init:{tmp_path / 'config.json'}"
