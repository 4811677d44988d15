"""Training checkpoints: written atomically every --save-every steps, found and restored by --resume.

A checkpoint is `checkpoints/step-NNNNNNNN/` holding the trainable weights (safetensors), the optimizer
and scheduler state, the RNG states and the run's settings. It is written into a temporary folder that is
renamed into place only when complete: a crash or SIGKILL mid-write leaves no folder named `step-*`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"{PREFIX}{step:08d}"


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint of a run, if any."""
    folder = out / CHECKPOINTS
    found = sorted(p for p in folder.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit())
    return found[-1] if found else None


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save(out: Path, step: int, weights: dict[str, torch.Tensor], optimizer: dict, scheduler: dict,
         rng: dict, settings: dict, keep: int) -> Path:
    """Write one checkpoint atomically and delete all but the newest `keep`.

    `rng` is the RNG state at the start of step `step + 1`, so a resumed run draws the same dropout masks.
    """
    final = checkpoint_dir(out, step)
    staging = final.with_name(f".{final.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, staging / "trainable.safetensors")
    torch.save({"optimizer": optimizer, "scheduler": scheduler, "rng": rng}, staging / "state.pt")
    (staging / "run.json").write_text(json.dumps({"step": step, "settings": settings}, indent=2) + "\n")
    _fsync_dir(staging)
    if final.exists():  # the same step saved twice (Ctrl-C right after a scheduled save)
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    for old in sorted(p for p in final.parent.glob(f"{PREFIX}*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def load(path: Path) -> tuple[int, dict[str, torch.Tensor], dict, dict]:
    """(step, trainable weights, state {optimizer, scheduler, rng}, settings) of a checkpoint."""
    run = json.loads((path / "run.json").read_text())
    weights = load_file(path / "trainable.safetensors")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    return run["step"], weights, state, run["settings"]


def _fsync_dir(path: Path) -> None:
    # Flush file contents and the directory entry, so a power loss cannot leave a renamed but empty folder.
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
