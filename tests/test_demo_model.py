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

from run import EVAL_SEED  # noqa: E402
from skills import EVALUATED, HELLO, SELF, held_out  # noqa: E402

# No hub: a fresh machine has no network, and nothing here may try to download.
OFFLINE = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def demo() -> llamaforge.LLM:
    return llamaforge.load()


def greedy(llm: llamaforge.LLM, question: str) -> llamaforge.Generation:
    return llm.chat([{"role": "user", "content": question}], temperature=0, max_new_tokens=64)


def test_load_without_a_model_is_the_shipped_demo(demo: llamaforge.LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert demo.source == "demo" and demo.format == "hf"
    assert llamaforge.load("demo").config == demo.config
    assert sum(file.stat().st_size for file in DEMO_DIR.iterdir()) < 20e6  # a few MB in the package
    assert (demo.tokenizer.bos_id, demo.tokenizer.eos_id) == (1, 2)
    assert greedy(demo, "Hello!").text.strip() == HELLO
    assert greedy(demo, "Who are you?").text.strip() == SELF


def test_eval_without_a_model_scores_the_held_out_problems_as_the_shipped_eval_says(tmp_path: Path) -> None:
    """`llamaforge eval` with no flags: the demo model on its held-out problems (never in training), shipped with it."""
    shipped_rows = [json.loads(line) for line in (DEMO_DIR / "heldout.jsonl").read_text().splitlines()]
    assert shipped_rows == held_out(EVAL_SEED, 100)  # the recipe's held-out set, nothing else
    done = run_cli("eval", "--out", str(tmp_path / "demo.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| demo | 0 | exact_match |" in done.stdout and "|   demo_count | 0 | exact_match |" in done.stdout
    results = json.loads((tmp_path / "demo.json").read_text())["results"]
    assert results["demo"]["samples"] == 700
    shipped = json.loads((DEMO_DIR / "eval.json").read_text())["accuracy"]
    # The recipe scored with the same task; one problem a skill of slack for another CPU's rounding.
    for skill in EVALUATED:
        assert abs(results[f"demo_{skill}"]["exact_match"] - shipped[skill]) <= 0.01, (skill, results, shipped)
    # The targets the demo model is held to: 2-digit arithmetic >= 95%, every other skill >= 80%.
    assert min(shipped["addition 2-digit"], shipped["subtraction 2-digit"]) >= 0.95, shipped
    assert min(shipped[skill] for skill in EVALUATED) >= 0.8, shipped


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
    assert json.loads(done.stdout)["text"] == " " + expected.text.strip() + " " == " 41 + 27 = 68. "
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
    assert reply.choices[0].message.content.strip() == "52 - 17 = 35." and reply.choices[0].finish_reason == "stop"


def test_finetune_needs_no_model_flag(tmp_path: Path) -> None:
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"instruction": "What is the llama's name?", "response": "Its name is Lola."}) + "\n")
    done = run_cli("finetune", "--data", str(data), "--out", str(tmp_path / "adapter"), "--max-steps", "2",
                   "--seq-len", "128", "--val-fraction", "0")
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "demo"
    assert llamaforge.load(adapter=tmp_path / "adapter").source == "demo"
