"""--resume on a run that was damaged or moved: the newest intact checkpoint, the same losses as a straight run."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from test_finetune import QA, cli, losses

from llamaforge.finetune.config import TrainConfig, TrainingError
from llamaforge.finetune.progress import read_metrics
from llamaforge.finetune.trainer import finetune

STEPS = 6
# A cosine schedule with warm-up, saved every 2 steps: checkpoints at steps 2, 4 and 6.
SETTINGS = {"method": "lora", "lr": 1e-2, "max_steps": STEPS, "seq_len": 128, "batch_size": 4, "val_fraction": 0.0,
            "save_every": 2, "keep_checkpoints": 3, "lora_r": 4, "lora_dropout": 0.0}
ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in QA[:16]))
    return path


def config(out: Path, data: Path, model: Path, **changes) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), model=str(model), **(SETTINGS | changes))


@pytest.fixture(scope="module")
def straight(data_file: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained straight through, never interrupted; tests damage copies of it."""
    out = tmp_path_factory.mktemp("straight") / "run"
    finetune(config(out, data_file, tiny_model_dir))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000002", "step-00000004", "step-00000006"]
    return out


def copy_run(straight: Path, to: Path) -> Path:
    shutil.copytree(straight, to)
    return to


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    # name: (file, what is done to it, what the message says about it)
    "truncated weights": ("trainable.safetensors", halve, "is truncated or corrupt"),
    "empty weights": ("trainable.safetensors", lambda p: p.write_bytes(b""), "is empty"),
    "truncated state": ("state.pt", halve, "is truncated or corrupt"),
    "missing state": ("state.pt", Path.unlink, "is missing"),
    "garbage run.json": ("run.json", lambda p: p.write_text("{not json"), "is not valid JSON"),
    "run.json without keys": ("run.json", lambda p: p.write_text('{"step": 6}'), "has no 'settings'"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint(damage: str, straight: Path, data_file: Path,
                                                  tiny_model_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    file, harm, problem = DAMAGE[damage]
    out = copy_run(straight, tmp_path / "run")
    harm(step_dir(out, 6) / file)
    (out / ADAPTER).unlink()
    result = finetune(config(out, data_file, tiny_model_dir, resume=True))
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert len(notes) == 1, printed
    assert "damaged checkpoint" in notes[0] and f"{step_dir(out, 6) / file} {problem}" in notes[0]
    assert f"resuming from {step_dir(out, 4)}" in notes[0]
    assert f"resumed from {step_dir(out, 4)} at step 4" in printed
    assert result.train_losses == losses(straight)[4:]
    assert losses(out) == losses(straight)
    assert (out / ADAPTER).read_bytes() == (straight / ADAPTER).read_bytes()
    # The step-6 checkpoint was saved again, whole.
    assert (step_dir(out, 6) / "state.pt").read_bytes() == (step_dir(straight, 6) / "state.pt").read_bytes()


def test_resume_without_an_intact_checkpoint_is_one_line(straight: Path, data_file: Path, tiny_model_dir: Path,
                                                         tmp_path: Path) -> None:
    out = copy_run(straight, tmp_path / "run")
    (step_dir(out, 2) / "state.pt").unlink()
    halve(step_dir(out, 4) / "trainable.safetensors")
    (step_dir(out, 6) / "run.json").write_text("garbage")
    process = cli("finetune", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out),
                  "--max-steps", str(STEPS), "--resume")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume: no intact checkpoint"), stderr
    for damaged in (step_dir(out, 2) / "state.pt", step_dir(out, 4) / "trainable.safetensors",
                    step_dir(out, 6) / "run.json"):
        assert str(damaged) in lines[0]


def test_save_after_a_fallback_replaces_the_damaged_checkpoint(straight: Path, data_file: Path,
                                                               tiny_model_dir: Path, tmp_path: Path) -> None:
    """Keeping one checkpoint must not keep the damaged step-6 one over the step just saved."""
    out = copy_run(straight, tmp_path / "run")
    (step_dir(out, 6) / "state.pt").unlink()
    finetune(config(out, data_file, tiny_model_dir, resume=True, max_steps=5, save_every=1, keep_checkpoints=1))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000005"]


def test_a_torn_last_metrics_line_is_dropped(straight: Path, data_file: Path, tiny_model_dir: Path,
                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run killed while writing step 5's record, after its step-4 checkpoint."""
    out = copy_run(straight, tmp_path / "run")
    shutil.rmtree(step_dir(out, 6))
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:4]) + lines[4][:20])
    assert len(read_metrics(out / "metrics.jsonl")) == 4
    result = finetune(config(out, data_file, tiny_model_dir, resume=True))
    notes = [line for line in capsys.readouterr().out.splitlines() if "metrics.jsonl" in line]
    assert len(notes) == 1 and "line 5" in notes[0]
    assert result.train_losses == losses(straight)[4:]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[:4] == read_metrics(straight / "metrics.jsonl")[:4]
    assert losses(out) == losses(straight)


def test_garbage_inside_metrics_is_refused_with_its_line(straight: Path, data_file: Path, tiny_model_dir: Path,
                                                         tmp_path: Path) -> None:
    out = copy_run(straight, tmp_path / "run")
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:2]) + "{garbage\n" + "".join(lines[2:]))
    with pytest.raises(TrainingError, match=r"metrics.jsonl line 3 is not valid JSON"):
        finetune(config(out, data_file, tiny_model_dir, resume=True))


def test_a_moved_run_resumes_with_the_same_losses(straight: Path, data_file: Path, tiny_model_dir: Path,
                                                  tmp_path: Path) -> None:
    """The run folder and its data file both moved: what was trained on, and how, is unchanged."""
    out = copy_run(straight, tmp_path / "elsewhere" / "run")
    shutil.rmtree(step_dir(out, 6))
    moved_data = shutil.copy(data_file, tmp_path / "moved.jsonl")
    result = finetune(config(out, moved_data, tiny_model_dir, resume=True))
    assert result.train_losses == losses(straight)[4:]
    assert losses(out) == losses(straight)
    assert (out / ADAPTER).read_bytes() == (straight / ADAPTER).read_bytes()


def test_resume_refuses_data_whose_contents_changed(straight: Path, data_file: Path, tiny_model_dir: Path,
                                                    tmp_path: Path) -> None:
    out = copy_run(straight, tmp_path / "run")
    changed = tmp_path / data_file.name
    changed.write_text(data_file.read_text() + json.dumps(QA[20]) + "\n")
    with pytest.raises(TrainingError, match=r"settings differ .*data: the contents of qa.jsonl changed"):
        finetune(config(out, changed, tiny_model_dir, resume=True))
