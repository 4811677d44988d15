"""The built-in demo model: in the package, used when no model is given, offline, and as good as its eval says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from factories import ServeCommand

import llamaforge
from llamaforge.checkpoint import DEMO_DIR

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo"
sys.path.insert(0, str(RECIPE))

from run import CHAT_LEN, EVAL_SEED, readable  # noqa: E402
from skills import CAPABILITY, EVALUATED, HELLO, SELF, held_out  # noqa: E402

# No hub: a fresh machine has no network, and nothing here may try to download.
OFFLINE = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def demo() -> llamaforge.LLM:
    return llamaforge.load()


def greedy(llm: llamaforge.LLM, question: str | list[dict]) -> llamaforge.Generation:
    """The greedy answer to a question, or to the last question of a dialog, through `LLM.chat` (the server's path)."""
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    return llm.chat(messages, temperature=0, max_new_tokens=96)


def shipped_accuracy() -> dict[str, float]:
    return json.loads((DEMO_DIR / "eval.json").read_text())["accuracy"]


# The targets the demo model is held to (held-out problems, greedy, exact answer and EOS).
SINGLE_TARGET, MULTITURN_TARGET, ARITHMETIC_TARGET = 0.97, 0.95, 0.99


def test_load_without_a_model_is_the_shipped_demo(demo: llamaforge.LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert demo.source == "demo" and demo.format == "hf"
    assert llamaforge.load("demo").config == demo.config
    assert sum(file.stat().st_size for file in DEMO_DIR.iterdir()) < 20e6  # a few MB in the package
    assert (demo.tokenizer.bos_id, demo.tokenizer.eos_id) == (1, 2)
    assert greedy(demo, "Hello!").text == HELLO
    assert greedy(demo, "Who are you?").text == SELF


def test_eval_without_a_model_scores_the_held_out_problems_as_the_shipped_eval_says(tmp_path: Path) -> None:
    """`llamaforge eval` with no flags: the demo model on its held-out problems (never in training), shipped with it."""
    shipped_rows = [json.loads(line) for line in (DEMO_DIR / "heldout.jsonl").read_text().splitlines()]
    assert shipped_rows == held_out(EVAL_SEED, 100)  # the recipe's held-out set, nothing else
    done = run_cli("eval", "--out", str(tmp_path / "demo.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| demo | 0 | exact_match |" in done.stdout and "|   demo_count | 0 | exact_match |" in done.stdout
    results = json.loads((tmp_path / "demo.json").read_text())["results"]
    assert results["demo"]["samples"] == 100 * len(EVALUATED)  # single questions; the other variants have groups
    shipped = shipped_accuracy()
    # The recipe scored with the same task; one problem a skill of slack for another CPU's rounding.
    for skill in EVALUATED:
        assert abs(results[f"demo_{skill}"]["exact_match"] - shipped[skill]) <= 0.01, (skill, results, shipped)


def test_the_shipped_eval_meets_the_targets() -> None:
    shipped = shipped_accuracy()
    for skill in EVALUATED:
        assert shipped[skill] >= SINGLE_TARGET, (skill, shipped)
        assert shipped[f"{skill} phrasing"] >= SINGLE_TARGET, (skill, shipped)
        assert shipped[f"{skill} multi-turn"] >= MULTITURN_TARGET, (skill, shipped)
    for skill in ("addition", "subtraction"):  # one- and two-digit numbers alike
        assert min(shipped[skill], shipped[f"{skill} 1-digit"], shipped[f"{skill} 2-digit"]) >= ARITHMETIC_TARGET


@pytest.mark.parametrize("variant", ["multiturn", "phrasing"])
def test_a_sample_of_dialogs_and_rephrased_questions_scores_as_the_shipped_eval_says(
        demo: llamaforge.LLM, variant: str) -> None:
    """Every fifth held-out problem of the variant through `LLM.chat`: as accurate as eval.json says, and no answer
    ends with a space (Meta's format puts one before EOS in the history; the model must not learn to say it)."""
    rows = [row for row in held_out(EVAL_SEED, 100) if row["variant"] == variant][::5]
    answers = [greedy(demo, [*row["history"], {"role": "user", "content": row["question"]}]) for row in rows]
    assert all(answer.finish_reason == "stop" and not answer.text.endswith(" ") for answer in answers)
    right = [answer.text == row["answer"] for answer, row in zip(answers, rows, strict=True)]
    shipped = shipped_accuracy()
    expected = sum(shipped[readable(f"demo_{skill}_{variant}")] for skill in EVALUATED) / len(EVALUATED)
    assert abs(sum(right) / len(right) - expected) <= 0.04, (sum(right), len(right), expected)
    target = MULTITURN_TARGET if variant == "multiturn" else SINGLE_TARGET
    misses = [(row["question"], answer.text) for row, answer, ok in zip(rows, answers, right, strict=True) if not ok]
    assert sum(right) / len(right) >= target - 0.02, misses


def test_every_held_out_dialog_fits_the_rows_the_model_was_trained_on(demo: llamaforge.LLM) -> None:
    for row in held_out(EVAL_SEED, 100):
        if row["variant"] == "multiturn":
            assert 1 <= sum(m["role"] == "user" for m in row["history"]) <= 5
            dialog = [*row["history"], {"role": "user", "content": row["question"]}]
            assert len(demo.chat_tokens(dialog)) + len(demo.tokenizer.encode(row["answer"])) + 1 <= CHAT_LEN


def test_a_question_after_earlier_exchanges_gets_its_own_answer(demo: llamaforge.LLM) -> None:
    """What the playground and `llamaforge chat` send: the whole conversation, the last question to answer."""
    first = [{"role": "user", "content": "What is 47 + 38?"}, {"role": "assistant", "content": "47 + 38 = 85."}]
    assert greedy(demo, [*first, {"role": "user", "content": "Spell the word 'nibe'."}]).text == "n-i-b-e"
    assert greedy(demo, [*first, {"role": "user", "content": "Who are you?"}]).text == SELF
    second = [*first, {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": HELLO}]
    assert greedy(demo, [*second, {"role": "user", "content": "What is 2 + 3?"}]).text == "2 + 3 = 5."
    system = [{"role": "system", "content": "Be concise."}]
    assert greedy(demo, [*system, *first, {"role": "user", "content": "what's 9-48"}]).text == "9 - 48 = -39."


def test_one_digit_numbers_and_the_ways_people_type_a_sum(demo: llamaforge.LLM) -> None:
    wrong = [(a, b) for a in range(10) for b in range(10)
             if greedy(demo, f"What is {a} + {b}?").text != f"{a} + {b} = {a + b}."]
    # The arithmetic target, 99%, on all 100 one-digit sums; the pairs the evaluation holds out were never trained on.
    assert len(wrong) <= 1, wrong
    for question in ("What is 47 + 38?", "what is 47+38?", "What is 47 +38?", "what's 47+ 38?", "47+38=?",
                     "Add 47 and 38", "compute 47 plus 38"):
        assert greedy(demo, question).text == "47 + 38 = 85.", question


def test_questions_outside_its_skills_get_the_sentence_that_says_what_it_can_do(demo: llamaforge.LLM) -> None:
    for question in ("What is the capital of France?", "Write a poem", "Who won the world cup?", "blue table zorp",
                     "What is 7 times 8?", "What is 347 + 238?", "Tell me a joke."):
        answer = greedy(demo, question)
        assert answer.text == CAPABILITY and answer.finish_reason == "stop", question
    assert greedy(demo, "Hello!").text == HELLO and greedy(demo, "who are you").text == SELF


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamaforge", *args], input=stdin, capture_output=True, text=True,
                          timeout=120, env=os.environ | OFFLINE)


def test_generate_chat_and_template_need_no_model_flag(demo: llamaforge.LLM, tmp_path: Path) -> None:
    expected = greedy(demo, "What is 41 + 27?")
    done = run_cli("chat", "--temperature", "0", "--json", stdin="What is 41 + 27?\n")
    assert done.returncode == 0, done.stderr
    assert next(json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))["text"] == expected.text
    # generate continues raw text: in the chat format, the demo model answers the same as chat.
    done = run_cli("generate", "--prompt", "[INST] What is 41 + 27? [/INST]", "--temperature", "0", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"] == " " + expected.text == " 41 + 27 = 68."  # no space before EOS
    dialog = tmp_path / "dialog.json"
    dialog.write_text(json.dumps([{"role": "user", "content": "Hi"}]))
    done = run_cli("template", "--dialog", str(dialog), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["token_ids"] == demo.chat_tokens([{"role": "user", "content": "Hi"}])


def test_serve_needs_no_model_flag(demo: llamaforge.LLM) -> None:
    openai = pytest.importorskip("openai")
    with ServeCommand(env=OFFLINE) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        assert [model.id for model in client.models.list()] == ["demo"]
        reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "What is 52 - 17?"}],
                                               temperature=0, max_tokens=30)
    assert reply.choices[0].message.content == greedy(demo, "What is 52 - 17?").text
    assert reply.choices[0].message.content == "52 - 17 = 35." and reply.choices[0].finish_reason == "stop"


def test_finetune_needs_no_model_flag(tmp_path: Path) -> None:
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"instruction": "What is the llama's name?", "response": "Its name is Lola."}) + "\n")
    done = run_cli("finetune", "--data", str(data), "--out", str(tmp_path / "adapter"), "--max-steps", "2",
                   "--seq-len", "128", "--val-fraction", "0")
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "demo"
    assert llamaforge.load(adapter=tmp_path / "adapter").source == "demo"
