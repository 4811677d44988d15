"""Fine-tuning on a small file with the default flags: the run adapts to the data and says how in one line,
warns when it is too short to learn, never wastes a step on lr 0, reports progress in a log, and learns."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
from test_finetune import base_dir, cli, qa_file  # noqa: F401 (fixtures)

import llamaforge
from llamaforge.finetune.config import TrainConfig
from llamaforge.finetune.data import Example
from llamaforge.finetune.plan import MIN_STEPS, plan_run
from llamaforge.finetune.progress import read_metrics
from llamaforge.finetune.trainer import finetune, lr_factor, warmup_steps

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "colors.jsonl"
NUMBER = r"[-+]?[\d.]+(?:e[-+]\d+)?"


def significant_digits(number: str) -> int:
    """How many significant digits a printed number shows: 8.367 and 0.01234 show 4."""
    mantissa = number.lstrip("+-").split("e")[0].replace(".", "")
    return len(mantissa.lstrip("0")) or 1


def examples(count: int, length: int) -> list[Example]:
    return [Example([1] * length, [1] * length) for _ in range(count)]


def settings(**changes) -> TrainConfig:
    return TrainConfig(data="data.jsonl", out="out", **changes)


# -- the learning-rate schedule -----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warm_up_never_trains_a_step_at_lr_0(schedule: str) -> None:
    total = 200
    warmup = warmup_steps(0.03, total)
    assert warmup == 6  # a fraction of the planned steps
    factors = [lr_factor(step, warmup, total, schedule) for step in range(total)]
    assert factors[0] > 0  # step 1 (scheduler step 0) already trains
    assert factors[:warmup + 1] == sorted(factors[:warmup + 1]) and factors[warmup] == 1.0
    assert min(factors) > 0  # nor does the last step of a decay
    # A run of one step (or of a few) has no warm-up: its only step trains at the peak.
    assert warmup_steps(0.03, 1) == 0 and lr_factor(0, 0, 1, schedule) == 1.0
    assert warmup_steps(0.03, 20) == 0


def test_the_first_step_trains_and_a_one_step_run_is_at_the_peak(qa_file: Path, base_dir: Path,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    common = {"seq_len": 128, "val_fraction": 0.0, "save_every": 0, "lr": 1e-3}
    finetune(TrainConfig(data=str(qa_file), out=str(tmp_path / "one"), model=str(base_dir), max_steps=1, **common))
    assert [r["lr"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "lr" in r] == [1e-3]
    finetune(TrainConfig(data=str(qa_file), out=str(tmp_path / "forty"), model=str(base_dir), max_steps=40,
                         warmup_ratio=0.1, **common))
    rates = [r["lr"] for r in read_metrics(tmp_path / "forty" / "metrics.jsonl") if "lr" in r]
    assert rates[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3]) and rates[-1] > 0  # 4 warm-up steps


# -- the plan: epochs, packing, validation and learning rate from the data and the model ------------------------


def test_thirty_short_records_train_long_enough_unpacked_and_say_why() -> None:
    plan = plan_run(settings(), examples(30, 31), global_batch=4, width=192)
    assert not plan.pack and len(plan.val_rows) == 0 and len(plan.train_rows) == 30
    assert plan.steps_per_epoch == 8 and plan.epochs >= 100 and plan.total_steps == plan.epochs * 8
    assert plan.lr == pytest.approx(2e-3)  # 2e-4 x 4096/192, at most 10x
    line = plan.summary()
    assert "\n" not in line and line.startswith("30 records (930 tokens)")
    for words in ("no validation split", "packing off", f"{plan.epochs} epochs = {plan.total_steps:,} steps",
                  "--epochs", "--max-steps", "--no-pack" if plan.pack else "--pack", "--val-fraction", "--lr"):
        assert words in line, (words, line)
    assert plan.warning is None


def test_a_large_dataset_keeps_the_usual_defaults() -> None:
    """Llama 2 7B on Dolly's 15k records: packed 2048-token rows, 5% held out, 1 epoch, LoRA at 2e-4."""
    plan = plan_run(settings(), examples(15_000, 120), global_batch=4, width=4096)
    assert plan.pack and len(plan.val_rows) == 750 and plan.epochs == 1
    assert len(plan.train_rows) == math.ceil(14_250 / (2048 // 120)) and plan.total_steps == plan.steps_per_epoch
    assert plan.lr == 2e-4 and plan_run(settings(method="full"), examples(50, 10), 4, width=5120).lr == 2e-5
    line = plan.summary()
    assert line.startswith("15,000 records (1,800,000 tokens): 750 held out for validation, packed into ")
    assert "1 epoch = " in line and "lr 2.00e-04" in line and "--" not in line  # nothing chosen for the user to undo
    assert plan.warning is None


def test_flags_given_are_kept() -> None:
    plan = plan_run(settings(epochs=2, pack=True, val_fraction=0.1, lr=1e-3), examples(30, 31), 4, width=192)
    assert plan.pack and len(plan.val_rows) == 3 and plan.epochs == 2 and plan.lr == 1e-3
    assert plan.total_steps == 2 and plan.warning is not None
    steps = plan_run(settings(max_steps=5), examples(30, 31), 4, width=192)
    assert steps.total_steps == 5 and "--max-steps 5" in steps.summary()
    assert steps.warning is None  # --max-steps asks for that many steps knowingly


def test_too_few_steps_is_one_warning_naming_the_numbers_and_the_flags() -> None:
    plan = plan_run(settings(epochs=1, pack=True), examples(30, 31), global_batch=4, width=192)
    warning = plan.warning
    assert plan.total_steps == 1 < MIN_STEPS and "\n" not in warning
    assert warning.startswith("warning: 1 optimizer step is too few to learn anything")
    for words in ("1 row", "4 rows per step", str(MIN_STEPS), "--epochs", "--max-steps", "--no-pack"):
        assert words in warning, (words, warning)
    unpacked = plan_run(settings(epochs=1), examples(30, 31), global_batch=4, width=192).warning
    assert unpacked.startswith("warning: 8 optimizer steps are too few") and "--no-pack" not in unpacked


def test_the_plan_and_the_warning_print_before_training(qa_file: Path, base_dir: Path, tmp_path: Path,  # noqa: F811
                                                       capsys: pytest.CaptureFixture) -> None:
    finetune(TrainConfig(data=str(qa_file), out=str(tmp_path / "run"), model=str(base_dir), epochs=1,
                         seq_len=128, save_every=0, val_fraction=0.1))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("50 records (") and "5 held out for validation" in lines[0]
    assert lines[1].startswith("warning: 12 optimizer steps are too few to learn anything")
    wrote = re.fullmatch(rf"wrote .* \(steps 12, final train loss ({NUMBER}), validation loss ({NUMBER})\)", lines[-1])
    assert wrote and all(significant_digits(number) <= 4 for number in wrote.groups()), lines[-1]


# -- progress where stderr is a file or a pipe -------------------------------------------------------------------


def test_progress_lines_reach_a_log_while_the_run_goes(qa_file: Path, base_dir: Path,  # noqa: F811
                                                       tmp_path: Path) -> None:
    process = cli("finetune", "--model", str(base_dir), "--data", str(qa_file), "--out", str(tmp_path / "run"),
                  "--max-steps", "200", "--seq-len", "128", "--save-every", "0")
    lines, running = [], []
    for line in process.stderr:  # not a terminal: plain lines, flushed as they are written
        lines.append(line.rstrip("\n"))
        running.append(process.poll() is None)
    assert process.wait(timeout=120) == 0, "\n".join(lines)
    progress = [(line, alive) for line, alive in zip(lines, running, strict=True) if line.startswith("step ")]
    assert progress and progress[0][1], lines  # the first line came while the run was still going
    assert progress[0][0].startswith("step 1/200 ") and progress[-1][0].startswith("step 200/200 ")
    assert 10 <= len(progress) <= 30  # the first step, each tenth, the last, every 10 s: not a line per step
    for line, _ in progress:
        match = re.fullmatch(rf"step \d+/200 \(\d+%\), loss ({NUMBER}), lr \d\.\d\de-\d\d, tok/s [\d,]+, "
                             r"[\d.,]+ step/s, elapsed \d+:\d\d(:\d\d)?, ETA \d+:\d\d(:\d\d)?", line)
        assert match and significant_digits(match.group(1)) <= 4, line
    assert "\r" not in "".join(lines)


# -- the defaults teach the demo model ---------------------------------------------------------------------------


def greedy_answers(llm: llamaforge.LLM, rows: list[dict]) -> list[str]:
    return [llm.chat(row["messages"][:-1], temperature=0, max_new_tokens=40).text.strip() for row in rows]


@pytest.mark.slow
def test_the_defaults_teach_the_demo_model_thirty_facts(tmp_path: Path) -> None:
    """`llamaforge finetune --data F --out D` and nothing else, as the README's walkthrough runs it."""
    rows = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    assert 25 <= len(rows) <= 35
    started = time.perf_counter()
    process = cli("finetune", "--data", str(EXAMPLE), "--out", str(tmp_path / "colors"))
    stdout, stderr = process.communicate(timeout=300)
    minutes = (time.perf_counter() - started) / 60
    assert process.returncode == 0, stderr[-3000:]
    assert "packing off" in stdout and "warning" not in stdout, stdout
    assert minutes < 5
    llm = llamaforge.load(adapter=tmp_path / "colors")
    got = greedy_answers(llm, rows)
    right = sum(answer == row["messages"][-1]["content"] for answer, row in zip(got, rows, strict=True))
    assert right >= 0.8 * len(rows), list(zip(got, rows, strict=True))
    # The demo model knew none of it before.
    assert greedy_answers(llamaforge.load(), rows[:3]) != [row["messages"][-1]["content"] for row in rows[:3]]
