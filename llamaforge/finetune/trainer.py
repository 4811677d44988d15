"""The fine-tuning loop: LoRA, QLoRA or full training, one process or FSDP2 under torchrun.

One optimizer step consumes a global batch of `batch_size * grad_accum * world_size` rows. Which rows
is a function of the step number alone (a seeded permutation per epoch), so a resumed run, or the same
run on a different number of processes, sees exactly the same data in the same steps. The loss of a
step is the sum of token losses over the whole global batch divided by its number of labelled tokens,
whatever the split into micro-batches and ranks, so accumulation and sharding change nothing but speed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llamaforge.api import MANIFEST, load
from llamaforge.chat import JINJA_TEMPLATE
from llamaforge.checkpoint.hf import read_config, save_hf_dir
from llamaforge.config import PRESETS, ModelArgs
from llamaforge.finetune import checkpoints, distributed
from llamaforge.finetune.config import TrainConfig, TrainingError
from llamaforge.finetune.data import IGNORE_INDEX, Example, Row, collate, encode_records, load_records
from llamaforge.finetune.plan import Plan, plan_run
from llamaforge.finetune.progress import METRICS_FILE, PLOT_FILE, Progress, plot_losses, read_metrics
from llamaforge.lora import LoraConfig, add_lora, save_adapter
from llamaforge.model import Llama, init_weights
from llamaforge.quantize import kernels, quantize_linears_nf4
from llamaforge.tokenizer import Tokenizer


@dataclass
class TrainResult:
    """What a finished (or interrupted) run produced."""

    out: Path
    steps: int
    train_losses: list[float] = field(default_factory=list)
    val_loss: float | None = None
    interrupted: bool = False


def finetune(config: TrainConfig) -> TrainResult:
    """Run one fine-tuning job end to end; only rank 0 writes files and prints."""
    info = distributed.setup(config.device)
    try:
        if config.objective in ("dpo", "reward"):
            from llamaforge.finetune.preference_trainer import PreferenceTrainer, RewardTrainer

            return (PreferenceTrainer if config.objective == "dpo" else RewardTrainer)(config, info).run()
        return Trainer(config, info).run()
    finally:
        distributed.teardown(info)


class Trainer:
    def __init__(self, config: TrainConfig, info: distributed.Dist) -> None:
        self.config = config
        self.info = info
        self.out = Path(config.out)
        self.precision = resolve_precision(config.precision, info.device)
        data_path = Path(config.data).expanduser()
        self.data_sha256 = _sha256(data_path) if data_path.is_file() else None
        if config.resume:
            self.resume_from = self._checkpoint_to_resume()
        else:
            self.resume_from = None
            self._check_out_is_new()
        torch.manual_seed(config.seed)
        self.model, self.tokenizer, self.base_name = build_model(config, info.device, self.precision)
        self.global_batch = config.batch_size * config.grad_accum * info.world_size
        self.plan = self._plan()
        self.train_rows, self.val_rows = self.plan.train_rows, self.plan.val_rows
        self.steps_per_epoch, self.total_steps = self.plan.steps_per_epoch, self.plan.total_steps
        if info.enabled:
            distributed.shard(self.model)
        self.optimizer = make_optimizer(self.model, config.weight_decay, self.plan.lr)
        warmup = warmup_steps(config.warmup_ratio, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup, self.total_steps, config.schedule))
        self.step = 0

    def _plan(self) -> Plan:
        """The run's rows and length (`data_notes`: what encoding the data truncated or dropped)."""
        examples, self.data_notes = encode_data(self.config, self.tokenizer)
        return plan_run(self.config, examples, self.global_batch, self.model.config.dim)

    def _collate(self, rows: list) -> dict[str, torch.Tensor]:
        """A micro-batch of rows as tensors."""
        return collate(rows, self.tokenizer.eos_id)

    def _check_out_is_new(self) -> None:
        if self.out.exists() and any(self.out.iterdir()):
            raise TrainingError(f"{self.out} already holds files; pass --resume to continue that run, "
                                "or choose a new --out directory")

    def _checkpoint_to_resume(self) -> checkpoints.Checkpoint:
        """The newest intact checkpoint, read whole once and checked against these settings before the model loads."""
        found, damaged = checkpoints.newest_intact(self.out)
        folder = self.out / checkpoints.CHECKPOINTS
        if found is None and not damaged:
            raise TrainingError(f"--resume: {self.out} has no checkpoint to resume from "
                                f"(looked for {folder}/{checkpoints.PREFIX}*)")
        if found is None:
            raise TrainingError(f"--resume: no intact checkpoint in {folder}: {'; '.join(map(str, damaged))}; "
                                "start the run again in a new --out")
        if damaged and self.info.is_main:
            print(f"warning: damaged checkpoint{'s' if len(damaged) > 1 else ''} skipped: "
                  f"{'; '.join(map(str, damaged))}; resuming from {found.path}")
        changed = self.config.same_run(found.settings, self.data_sha256, found.data_sha256)
        if changed:
            raise TrainingError(f"--resume: these settings differ from the run in {self.out}: {'; '.join(changed)}. "
                                "Resume with the original settings (max-steps and save-every may change)")
        return found

    # -- the loop --------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        if self.resume_from is not None:
            self._restore(self.resume_from)
            self.resume_from = None  # its tensors are in the model and optimizer now; free the copies
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for note in self.data_notes[:5]:
                print(f"warning: {note}")
            if len(self.data_notes) > 5:
                print(f"warning: {len(self.data_notes) - 5} more rows longer than --seq-len")
            # Flushed: when stdout is a log file, what the run will do is there before it starts.
            print(self.plan.summary(), flush=True)
            if self.plan.warning:
                print(self.plan.warning, flush=True)
        progress = Progress(self.out, self.total_steps, self.step, self.info.is_main)
        result = TrainResult(self.out, self.step)
        validation: dict = {}
        stop = StopRequest()
        try:
            with stop.installed():
                while self.step < self.total_steps:
                    record = self._train_step()
                    self.step += 1
                    rng_at_step_start = checkpoints.rng_states()  # what the next step starts from
                    progress.log(record)
                    result.train_losses.append(record["loss"])
                    if self.config.eval_every and self.step % self.config.eval_every == 0 and self.val_rows:
                        validation = {"step": self.step, **self._validation()}
                        progress.log(validation)
                    if self.config.save_every and self.step % self.config.save_every == 0:
                        self._save_checkpoint(rng_at_step_start)
                    # Every rank stops at the same step, or the checkpoint's collectives would hang.
                    if self.step < self.total_steps and distributed.all_sum(float(stop.requested), self.info):
                        return self._stop(result, progress, rng_at_step_start)
        except KeyboardInterrupt:  # a second Ctrl-C: out now, mid-step, without saving
            progress.close()
            last = checkpoints.latest(self.out)
            if self.info.is_main:
                print("\nstopped in the middle of a step, without saving"
                      + (f"; the last checkpoint is {last}" if last else ""))
            result.steps, result.interrupted = self.step, True
            return result
        result.steps = self.step
        if self.val_rows:
            if validation.get("step") != self.step:
                validation = {"step": self.step, **self._validation()}
                progress.log(validation)
            result.val_loss = validation["val_loss"]
        progress.close()
        self._write_outputs(result)
        return result

    def _stop(self, result: TrainResult, progress: Progress, rng_at_step_start) -> TrainResult:
        """Save a checkpoint at the step just finished and report how to go on."""
        self._save_checkpoint(rng_at_step_start)
        progress.close()
        if self.info.is_main:
            print(f"\ninterrupted after step {self.step}; checkpoint saved in "
                  f"{checkpoints.checkpoint_dir(self.out, self.step)}; continue with the same command and --resume")
        result.steps, result.interrupted = self.step, True
        return result

    def _step_rows(self, step: int) -> list[Row]:
        """The global batch of a step: consecutive rows of the epoch's seeded permutation, wrapping around."""
        epoch, index = divmod(step, self.steps_per_epoch)
        n = len(self.train_rows)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 100_003 + epoch))
        start = index * self.global_batch
        return [self.train_rows[int(order[(start + i) % n])] for i in range(self.global_batch)]

    def _start_step(self, rows: list[Row]) -> None:
        """Hook: a step's global batch, before its micro-batches run (the preference trainer counts it)."""

    def _train_step(self) -> dict:
        started = time.perf_counter()
        self.model.train()
        rows = self._step_rows(self.step)
        self._start_step(rows)
        total_labels = sum(row.n_labels for row in rows)
        if total_labels == 0:
            raise TrainingError(f"step {self.step + 1} has no labelled tokens: every row's answer was cut off; "
                                "raise --seq-len or use --on-long drop")
        per_micro = self.config.batch_size * self.info.world_size
        loss_sum = 0.0
        tokens = 0
        for micro in range(self.config.grad_accum):
            micro_rows = rows[micro * per_micro:(micro + 1) * per_micro]
            local = micro_rows[self.info.rank * self.config.batch_size:(self.info.rank + 1) * self.config.batch_size]
            batch = self._collate(local)
            tokens += sum(len(row.input_ids) for row in local)
            micro_sum = self._loss_sum(batch)
            # FSDP averages gradients over ranks: scale by world_size so the result is the global sum / labels.
            (micro_sum * (self.info.world_size / total_labels)).backward()
            loss_sum += float(micro_sum.detach())
        loss = distributed.all_sum(loss_sum, self.info) / total_labels
        tokens = distributed.all_sum(tokens, self.info)
        grad_norm = self._clip()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            last = checkpoints.latest(self.out)
            raise TrainingError(
                f"the loss became {loss} (gradient norm {grad_norm}) at step {self.step + 1}; training stopped "
                f"before the weights were touched. Lower --lr (now {self.plan.lr:g}), keep --clip at 1.0, or use "
                "--precision fp32; then --resume from the last checkpoint" + (f" ({last})" if last else ""))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        return {"step": self.step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": tokens / elapsed, "epoch": round((self.step + 1) / self.steps_per_epoch, 4)}

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return token_loss_sum(self.model, batch, self.info.device, self.precision)

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.config.clip if self.config.clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _validation(self) -> dict[str, float]:
        """What a validation pass logs: the loss (and, in subclasses, their metrics on the validation rows)."""
        return {"val_loss": self.evaluate()}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per labelled token over the validation rows."""
        self.model.eval()
        size = self.config.batch_size
        world, rank = self.info.world_size, self.info.rank
        loss_sum, labels = 0.0, 0
        for start in range(0, len(self.val_rows), size * world):
            chunk = self.val_rows[start:start + size * world]
            local = chunk[rank * size:(rank + 1) * size] or chunk[:1]  # every rank must run the forward
            counted = bool(chunk[rank * size:(rank + 1) * size])
            value = self._eval_loss(local, counted)
            if counted:
                loss_sum += value
                labels += sum(row.n_labels for row in local)
        return distributed.all_sum(loss_sum, self.info) / max(distributed.all_sum(labels, self.info), 1)

    def _eval_loss(self, rows: list, counted: bool) -> float:
        """The summed loss of validation rows; `counted` False: a rank's stand-in batch, run only so that every
        rank joins the forward's collectives."""
        return float(self._loss_sum(self._collate(rows)))

    # -- checkpoints and outputs -------------------------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        names = {name for name, p in self.model.named_parameters() if p.requires_grad}
        return {name: tensor for name, tensor in self._full_state().items() if name in names}

    def _optimizer_state(self) -> dict:
        if self.info.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _save_checkpoint(self, rng: dict) -> None:
        weights, optimizer = self._trainable_state(), self._optimizer_state()
        if self.info.is_main:
            state = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "rng": rng}
            checkpoints.save(self.out, self.step, weights, state, self.config.to_dict(), self.data_sha256,
                             self.config.keep_checkpoints)
        distributed.barrier(self.info)

    def _restore(self, checkpoint: checkpoints.Checkpoint) -> None:
        weights, state, path = checkpoint.weights, checkpoint.state, checkpoint.path
        if self.info.enabled:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.model, weights, options=options)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        else:
            missing = set(weights) - {name for name, _ in self.model.named_parameters()}
            if missing:
                raise TrainingError(f"checkpoint {path} does not fit this model (e.g. {sorted(missing)[:2]})")
            self.model.load_state_dict(weights, strict=False)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        checkpoints.set_rng_states(state["rng"])
        self.step = checkpoint.step
        if self.info.is_main:
            print(f"resumed from {path} at step {self.step}")

    def _write_outputs(self, result: TrainResult) -> None:
        method = self.config.method
        if method == "full":
            state = self._full_state()
        else:
            weights = self._trainable_state()
        if not self.info.is_main:
            distributed.barrier(self.info)
            return
        if method == "full":
            self._save_model(state, torch.bfloat16 if self.precision == torch.bfloat16 else torch.float32)
        else:
            self._save_adapter(weights)
        plot_losses(self.out / METRICS_FILE, self.out / PLOT_FILE)
        write_manifest(self, result)
        final = f"{result.train_losses[-1]:.4g}" if result.train_losses else "n/a"
        print(f"wrote {self.out / 'model' if method == 'full' else self.out} (steps {result.steps}, final train loss "
              + final + (f", validation loss {result.val_loss:.4g})" if result.val_loss is not None else ")"))
        distributed.barrier(self.info)

    def _save_adapter(self, weights: dict[str, torch.Tensor]) -> None:
        """Write the trained adapters (`weights`: the trainable tensors) as a peft adapter in out/."""
        save_adapter(self.model, self.out, base_model=self.base_name, weights=weights)

    def _save_model(self, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Write every weight of a full run as an HF model in out/model."""
        save_hf_dir(state, self.model.config, self.out / "model", self.tokenizer, dtype, chat_template=JINJA_TEMPLATE)

    def _full_state(self) -> dict[str, torch.Tensor]:
        """Every tensor of the model by name, gathered whole from the ranks' shards under FSDP (a collective)."""
        if self.info.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {name: tensor.detach() for name, tensor in self.model.state_dict().items()}


# -- building blocks --------------------------------------------------------------------------------------


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                   precision: torch.dtype) -> torch.Tensor:
    """Summed cross-entropy of a batch's labelled tokens, computing logits only where there are labels.

    Packed or padded rows pass their positions (a block-diagonal mask); plain rows use the causal
    kernel, which on GPUs is flash attention.
    """
    input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    positions = batch["positions"].to(device)
    plain = bool((positions == torch.arange(positions.shape[1], device=device)).all())
    targets = labels[:, 1:]  # (B, T-1): token t predicts token t+1
    predict = F.pad(targets != IGNORE_INDEX, (0, 1), value=False)  # (B, T)
    with autocast(device, precision):
        return model(input_ids, None if plain else positions, logits_at=predict,
                     targets=targets[targets != IGNORE_INDEX])


def autocast(device: torch.device, precision: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast when the run's precision is bf16, else nothing."""
    if precision == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """bf16 autocast where the device supports it ("auto": CUDA with bf16), else float32."""
    if precision == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def build_model(config: TrainConfig, device: torch.device, precision: torch.dtype) -> tuple[Llama, Tokenizer, str]:
    """The model to train (method applied, trainable parameters chosen), its tokenizer and its base's name."""
    if config.init is not None:
        tokenizer = Tokenizer(config.tokenizer)
        args = init_config(config.init, tokenizer)
        model = init_weights(Llama(args), seed=config.seed).to(device)
        return prepare(model, config, device), tokenizer, f"init:{config.init}"
    # Full training keeps float32 master weights; adapters train in float32 over a frozen base in the
    # compute precision (bf16 halves its memory), and QLoRA then stores that base in 4 bits.
    base_dtype = torch.float32 if config.method == "full" else precision
    llm = load(config.model, dtype=base_dtype, device=device, tokenizer=config.tokenizer)
    if llm.tokenizer is None:
        raise TrainingError(f"{config.model} has no tokenizer beside it; pass --tokenizer tokenizer.model")
    model = llm.model
    if config.method == "qlora":
        quantize_linears_nf4(model)
    if config.method in ("lora", "qlora"):
        targets = "all-linear" if list(config.lora_targets) == ["all-linear"] else list(config.lora_targets)
        add_lora(model, LoraConfig(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                   target_modules=targets))
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    return prepare(model, config, device), llm.tokenizer, str(config.model)


def prepare(model: Llama, config: TrainConfig, device: torch.device) -> Llama:
    """Gradient checkpointing and compilation as configured; training mode."""
    model.gradient_checkpointing = config.gradient_checkpointing
    if config.compile if config.compile is not None else device.type == "cuda":
        kernels.mark_constants_for_compile()
        model.compile_layers()
    return model.train()


def init_config(init: str, tokenizer: Tokenizer) -> ModelArgs:
    """A preset name (its shape, the tokenizer's vocabulary) or an HF config.json / directory (exactly)."""
    if init in PRESETS:
        return PRESETS[init].replace(vocab_size=tokenizer.vocab_size)
    path = Path(init)
    directory = path.parent if path.name == "config.json" else path
    if not (directory / "config.json").is_file():
        raise TrainingError(f"--init {init}: not a preset ({', '.join(PRESETS)}) and no config.json there")
    args = read_config(directory)
    if args.vocab_size != tokenizer.vocab_size:
        raise TrainingError(f"--init {init} has vocab_size {args.vocab_size} but the tokenizer has "
                            f"{tokenizer.vocab_size}; make them equal")
    return args


def encode_data(config: TrainConfig, tokenizer: Tokenizer) -> tuple[list[Example], list[str]]:
    """The usable examples of the data, and notes on truncated or dropped records."""
    records = load_records(config.data)
    examples, notes = encode_records(tokenizer, records, config.seq_len, config.on_long)
    if not examples:
        raise TrainingError(f"no usable examples in {config.data} (all longer than --seq-len {config.seq_len}?)")
    return examples, notes


def make_optimizer(model: nn.Module, weight_decay: float, lr: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on norms (1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8,
                             fused=fused or None)


def warmup_steps(warmup_ratio: float, total: int) -> int:
    """Warm-up length: the fraction of the planned steps, rounded down, so a run of a few steps has none."""
    return int(warmup_ratio * total)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """transformers' schedules, less their step at lr 0: a linear warm-up, then cosine or linear decay (or constant).

    `step` counts from 0 for the first optimizer step. transformers' warm-up gives that step `0 / warmup`,
    a step that trains nothing; here warm-up step s has (s + 1) / (warmup + 1), so the first trains and the
    peak comes right after the last. The decay reaches 0 only at `total`, one step after the last.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


def write_manifest(trainer: Trainer, result: TrainResult) -> None:
    """A small JSON record of what produced this output."""
    config, plan = trainer.config, trainer.plan
    try:
        version = metadata.version("llamaforge")
    except metadata.PackageNotFoundError:
        version = "unknown"
    manifest = {
        "llamaforge_version": version, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": trainer.base_name, "method": config.method,
        "data": {"source": config.data, "sha256": trainer.data_sha256,
                 "train_rows": len(trainer.train_rows), "validation_rows": len(trainer.val_rows)},
        # As they ran: the values chosen for settings left to the data (None in the settings a resume compares).
        "hyperparameters": config.to_dict() | {"val_fraction": plan.val_fraction, "pack": plan.pack,
                                               "epochs": plan.epochs, "lr": plan.lr},
        "plan": plan.summary(), "steps": result.steps, "world_size": trainer.info.world_size,
        "final_train_loss": result.train_losses[-1] if result.train_losses else None,
        "final_validation_loss": result.val_loss,
        "torch": torch.__version__, "python": platform.python_version(),
        "losses": [r["loss"] for r in read_metrics(trainer.out / METRICS_FILE) if "loss" in r][-10:],
    }
    (trainer.out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler stopping the job) asks the loop to stop once the current step
    is done, so the checkpoint it saves is exactly that step; a second signal stops at once, unsaved."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        try:
            previous = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
