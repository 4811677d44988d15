"""Training checkpoints: written atomically every --save-every steps, found and restored by --resume.

A checkpoint is `checkpoints/step-NNNNNNNN/` holding the trainable weights (safetensors), the optimizer
and scheduler state, the RNG states and the run's settings. It is written into a temporary folder that is
renamed into place only when complete: a crash or SIGKILL mid-write leaves no folder named `step-*`.
A failing or full disk, or a copy cut short, can still damage one, so --resume reads each checkpoint
whole, newest first, and goes on from the first that is intact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
WEIGHTS, STATE, RUN = "trainable.safetensors", "state.pt", "run.json"
STATE_KEYS = ("optimizer", "scheduler", "rng")


@dataclass
class Checkpoint:
    """A checkpoint read whole: what --resume restores, and the identity of the run that wrote it."""

    path: Path
    step: int
    weights: dict[str, torch.Tensor]
    state: dict  # {optimizer, scheduler, rng}
    settings: dict
    data_sha256: str | None  # None for a hub dataset, or a checkpoint from before the hash was recorded


class DamagedCheckpoint(Exception):
    """A checkpoint file that is missing or unreadable; the message names the file and what is wrong."""

    def __init__(self, file: Path, problem: str) -> None:
        super().__init__(f"{file} {problem}")


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"{PREFIX}{step:08d}"


def checkpoint_dirs(out: Path) -> list[Path]:
    """The checkpoint folders of a run, oldest first."""
    folder = out / CHECKPOINTS
    return sorted((p for p in folder.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX):].isdigit()),
                  key=_step_of)


def latest(out: Path) -> Path | None:
    """The newest checkpoint folder of a run, if any (intact or not)."""
    found = checkpoint_dirs(out)
    return found[-1] if found else None


def newest_intact(out: Path) -> tuple[Checkpoint | None, list[DamagedCheckpoint]]:
    """The newest checkpoint that reads whole (None if none does), and what is wrong with each newer one."""
    damaged = []
    for path in reversed(checkpoint_dirs(out)):
        try:
            return load(path), damaged
        except DamagedCheckpoint as exc:
            damaged.append(exc)
    return None, damaged


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save(out: Path, step: int, weights: dict[str, torch.Tensor], state: dict, settings: dict,
         data_sha256: str | None, keep: int) -> Path:
    """Write one checkpoint atomically and delete all but the newest `keep`.

    `state` holds the optimizer, scheduler and RNG states; the RNG state is the one at the start of step
    `step + 1`, so a resumed run draws the same dropout masks.
    """
    final = checkpoint_dir(out, step)
    staging = final.with_name(f".{final.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, staging / WEIGHTS)
    torch.save(state, staging / STATE)
    run = {"step": step, "settings": settings, "data_sha256": data_sha256}
    (staging / RUN).write_text(json.dumps(run, indent=2) + "\n")
    _fsync_dir(staging)
    if final.exists():  # the same step saved twice (Ctrl-C right after a scheduled save)
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    _prune(out, step, keep)
    return final


def _prune(out: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step`; delete any after it.

    A checkpoint after the step just saved is one that --resume found damaged and went back past: this
    run is redoing its steps, and left in place it would count towards `keep` in place of an intact one.
    """
    found = checkpoint_dirs(out)
    upto = [path for path in found if _step_of(path) <= step]
    for path in [path for path in found if _step_of(path) > step] + upto[:-keep]:
        shutil.rmtree(path)


def load(path: Path) -> Checkpoint:
    """Read a checkpoint whole; DamagedCheckpoint names the first of its files that is missing or unreadable."""
    step, settings, data_sha256 = _read_run(path / RUN)
    state = _read_state(path / STATE)
    weights = _read_weights(path / WEIGHTS)
    return Checkpoint(path, step, weights, state, settings, data_sha256)


def _read_run(file: Path) -> tuple[int, dict, str | None]:
    _require(file)
    try:
        run = json.loads(file.read_bytes())
    except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not text
        raise DamagedCheckpoint(file, f"is not valid JSON ({exc})") from None
    if not isinstance(run, dict):
        raise DamagedCheckpoint(file, "does not hold a JSON object")
    for key, kind in (("step", int), ("settings", dict)):
        if key not in run:
            raise DamagedCheckpoint(file, f"has no '{key}'")
        if not isinstance(run[key], kind):
            raise DamagedCheckpoint(file, f"has a '{key}' that is not a {kind.__name__}")
    return run["step"], run["settings"], run.get("data_sha256")


def _read_state(file: Path) -> dict:
    _require(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged file (OSError, RuntimeError, pickle's)
        raise DamagedCheckpoint(file, f"is truncated or corrupt (torch.load: {_first_line(exc)})") from None
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise DamagedCheckpoint(file, f"has no {', '.join(missing)} state")
    return state


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    _require(file)
    try:
        return load_file(file)
    except (SafetensorError, OSError) as exc:
        raise DamagedCheckpoint(file, f"is truncated or corrupt (safetensors: {_first_line(exc)})") from None


def _require(file: Path) -> None:
    if not file.is_file():
        raise DamagedCheckpoint(file, "is missing")
    if file.stat().st_size == 0:
        raise DamagedCheckpoint(file, "is empty")


def _first_line(exc: Exception) -> str:
    # The error lines name one file each; torch's weights_only errors run to a dozen lines of advice.
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


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
