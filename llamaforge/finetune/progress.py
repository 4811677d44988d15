"""What a run reports: a progress bar, metrics.jsonl, TensorBoard when installed, a loss plot at the end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class Progress:
    """Writes one JSON line per logged step (and per validation), mirrors it to TensorBoard, draws the bar."""

    def __init__(self, out: Path, total_steps: int, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / METRICS_FILE
        self.bar = None
        self.tensorboard = None
        if not enabled:
            return
        keep_until(self.path, start_step)  # a resumed run rewrites the steps after its checkpoint
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=None, file=sys.stderr)
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
                self.bar.update(record["step"] - self.bar.n)
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            else:
                self.bar.write(f"step {record['step']}: validation loss {record['val_loss']:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def keep_until(path: Path, step: int) -> None:
    """Drop the records after `step` (those a killed run logged past its last checkpoint)."""
    kept = [record for record in read_metrics(path) if record["step"] <= step]
    if path.is_file() or kept:
        path.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")


def plot_losses(metrics: Path, out: Path) -> Path | None:
    """Draw train and validation loss against step into a PNG (None when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        axes.plot(*zip(*val, strict=True), "o-", label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
    return out
