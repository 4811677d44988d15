"""Every setting of a fine-tuning run, checked before any weight is loaded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from llamaforge.config import DEMO, LINEAR_LAYERS
from llamaforge.errors import LlamaforgeError

# Light on purpose (no torch): the CLI builds its --help from these settings.
ON_LONG = ("truncate", "drop", "error")  # what to do with an example longer than seq_len

METHODS = ("lora", "qlora", "full")
OBJECTIVES = ("sft", "dpo", "reward")  # answers; preference pairs for the policy, or for a reward model
PREFERENCE_LOSSES = ("sigmoid", "ipo", "robust")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_VAL_FRACTION = 0.05


class TrainingError(LlamaforgeError):
    """A fine-tuning run that cannot start or go on, with what to change."""


@dataclass
class TrainConfig:
    """A fine-tuning run: what to train, on what, how, and where to write it.

    None for pack, val_fraction, epochs or lr: chosen from the data and the model (`finetune.plan`).
    """

    data: str
    out: str
    model: str | None = None  # None without --init: the built-in demo model
    init: str | None = None  # a preset name or config.json: train from random weights (method full)
    tokenizer: str | None = None
    method: str = "lora"
    objective: str = "sft"
    loss_type: str = "sigmoid"  # dpo: sigmoid (DPO), ipo or robust
    beta: float = 0.1  # dpo: how far from the reference model the policy may move
    label_smoothing: float = 0.0  # dpo: the share of pairs assumed mislabelled (conservative / robust DPO)
    rpo_alpha: float = 0.0  # dpo: weight of the chosen answers' NLL added to the loss (RPO); 0: off
    seq_len: int = 2048
    pack: bool | None = None  # None: when packed rows still make enough steps an epoch
    on_long: str = "truncate"
    val_fraction: float | None = None  # None: DEFAULT_VAL_FRACTION when it holds out enough records
    epochs: float | None = None  # None: 1, more for small data
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None  # None: by method (2e-4 adapters, 2e-5 full) and model width
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    clip: float = 1.0
    seed: int = 0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    compile: bool | None = None  # torch.compile each layer; None: on CUDA (1.5x there), off on CPU (no gain)
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(LINEAR_LAYERS))
    save_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: only at the end
    resume: bool = False
    device: str | None = None

    def __post_init__(self) -> None:
        if self.model is None and self.init is None:
            self.model = DEMO
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise TrainingError(message)

        need(self.method in METHODS, f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        need(self.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}, not "
             f"{self.objective!r}")
        need(self.loss_type in PREFERENCE_LOSSES, f"--loss-type must be one of {', '.join(PREFERENCE_LOSSES)}")
        need(self.beta > 0, "--beta must be positive")
        need(0 <= self.label_smoothing < 0.5, "--label-smoothing must be in [0, 0.5)")
        need(self.rpo_alpha >= 0, "--rpo-alpha must be 0 (off) or positive")
        need(self.objective == "sft" or self.init is None, f"--objective {self.objective} tunes a trained model; "
             "drop --init")
        need(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        need(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}")
        need(self.on_long in ON_LONG, f"--on-long must be one of {', '.join(ON_LONG)}")
        need((self.model is None) != (self.init is None),
             "pass exactly one of --model (fine-tune these weights) and --init (train a new model from a config)")
        need(self.init is None or self.method == "full", "--init trains every weight from scratch: use --method full")
        need(self.init is None or self.tokenizer is not None, "--init needs --tokenizer (the new model's vocabulary)")
        for name in ("seq_len", "batch_size", "grad_accum", "lora_r", "keep_checkpoints"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
        for name in ("save_every", "eval_every"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be 0 (off) or more")
        need(self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1")
        need(self.epochs is None or self.epochs > 0, "--epochs must be positive")
        need(self.lr is None or self.lr > 0, "--lr must be positive")
        need(0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)")
        need(self.val_fraction is None or 0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)")
        need(self.clip >= 0, "--clip must be 0 (off) or positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def same_run(self, saved: dict, data_sha256: str | None, saved_data_sha256: str | None) -> list[str]:
        """Settings that differ from a saved run's and would change its results (for --resume).

        Where the run's folder is does not matter, so a moved run resumes; nor where its data file is when
        the SHA-256 of both files is known: then what is compared is the data itself.
        """
        ignored = {"out", "resume", "max_steps", "save_every", "keep_checkpoints", "eval_every", "device"}
        changed = []
        if data_sha256 and saved_data_sha256:
            ignored.add("data")
            if data_sha256 != saved_data_sha256:
                changed.append(f"data: the contents of {Path(self.data).name} changed "
                               f"(sha256 {saved_data_sha256[:12]}... -> {data_sha256[:12]}...)")
        return changed + [f"{key}: {_shown(saved.get(key))} -> {_shown(value)}" for key, value in self.to_dict().items()
                          if key not in ignored and saved.get(key) != value]


def _shown(value: object) -> str:
    """A setting as --resume's message shows it: None is a default chosen from the data ("auto")."""
    return "auto" if value is None else repr(value)
