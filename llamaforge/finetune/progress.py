"""What a run reports: a progress bar (or lines, in a log), metrics.jsonl, TensorBoard when installed, a loss
plot at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

from llamaforge.finetune.config import TrainingError
from llamaforge.progress import ProgressBar

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class Progress:
    """Writes one JSON line per logged step (and per validation), mirrors it to TensorBoard, shows progress."""

    def __init__(self, out: Path, total_steps: int, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / METRICS_FILE
        self.bar = None
        self.tensorboard = None
        if not enabled:
            return
        torn = keep_until(self.path, start_step)  # a resumed run rewrites the steps after its checkpoint
        if torn:
            print(f"warning: {torn}")
        self.bar = ProgressBar(total_steps, "step", "step", initial=start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # TensorBoard is optional
            self.tensorboard = None

    def log(self, record: dict) -> None:
        """Append one record ({"step": N, "loss": ...} or {"step": N, "val_loss": ...})."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])
        if self.bar is not None:
            if "loss" in record:
                self.bar.update(record["step"] - self.bar.n, loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2e}",
                                **{"tok/s": f"{record['tokens_per_s']:,.0f}"})
            else:
                self.bar.write(f"step {record['step']}: validation loss {record['val_loss']:.4g}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, less a last line cut off mid-write."""
    return load_metrics(path)[0]


def load_metrics(path: Path) -> tuple[list[dict], str | None]:
    """The records of a metrics.jsonl, and a note if its last line was cut off mid-write and left out.

    A run killed while appending a record leaves half a line at the end; a line that is not a record
    anywhere else is damage that no kill explains, and an error naming the line.
    """
    if not path.is_file():
        return [], None
    lines = [(number, line) for number, line in enumerate(path.read_bytes().split(b"\n"), start=1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        record = _parse_record(line)
        if record is not None:
            records.append(record)
        elif index == len(lines) - 1:
            return records, f"{path} line {number} was cut off mid-write (the run stopped while writing it); dropped it"
        else:
            raise TrainingError(f"{path} line {number} is not valid JSON with a step; fix or delete that line")
    return records, None


def _parse_record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not text
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def keep_until(path: Path, step: int) -> str | None:
    """Drop the records after `step` (those a killed run logged past its last checkpoint), atomically.

    Returns the note of load_metrics on a torn last line, which is dropped too.
    """
    records, torn = load_metrics(path)
    if path.is_file():
        staging = path.with_name(f".{path.name}.partial")
        staging.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= step), encoding="utf-8")
        os.replace(staging, path)
    return torn


def plot_losses(metrics: Path, out: Path) -> Path | None:
    """Draw train and validation loss against step into a PNG, beside the reward margins and accuracies of a
    preference run (None when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics)
    preference = any(PREFERENCE_METRICS[0] in r for r in records)
    figure, panels = plt.subplots(1, 2 if preference else 1, figsize=(12 if preference else 7, 4), dpi=100,
                                  squeeze=False)
    _plot(panels[0][0], records, "loss", log=True)
    if preference:
        for name in PREFERENCE_METRICS:
            _plot(panels[0][1], records, name, log=False)
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
    return out


# What a preference run's plot shows beside its loss: how far the chosen answers pull ahead, and how often.
PREFERENCE_METRICS = ("rewards/margins", "rewards/accuracies")


def _plot(axes, records: list[dict], name: str, log: bool) -> None:
    """One metric's training curve and its validation points ("val_" + name) on `axes`."""
    train = [(r["step"], r[name]) for r in records if name in r]
    val = [(r["step"], r["val_" + name]) for r in records if "val_" + name in r]
    if train:
        axes.plot(*zip(*train, strict=True), label=f"train {name}", linewidth=1)
    if val:
        axes.plot(*zip(*val, strict=True), "o-", label=f"validation {name}")
    axes.set_xlabel("step")
    if log:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()
