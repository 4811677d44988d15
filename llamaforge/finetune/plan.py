"""What a run trains on and for how long, where its flags leave it open: validation split, packing, epochs, lr.

The defaults are the usual ones for a large model on a large dataset (Llama 2 7B on Dolly's 15k records:
5% held out, packed 2048-token rows, 1 epoch, LoRA at 2e-4). They adapt where those would learn nothing,
and `Plan.summary` says in one line what was chosen, why, and which flag sets it:

- validation: --val-fraction's 5% only when that holds out at least MIN_VALIDATION records. Of 30 records it
  would hold out 2, whose answers the model then never sees, for a loss too noisy to tell anything.
- packing: on when the packed rows still make MIN_STEPS optimizer steps an epoch. 30 short records fill one
  2048-token row: one step an epoch, its batch that one row four times.
- epochs: 1, or for a small dataset as many as show the model TARGET_EXAMPLES examples, at most MAX_EPOCHS.
  The demo model needs about 100 passes over 28 made-up facts to answer them word for word (LoRA at 1e-3 to
  4e-3, batch 4: 50 epochs recalled 3-5 of them, 71 epochs 17, 100 epochs 27-28); 30 records train 134
  epochs, 1,000 records 4, 4,000 or more 1.
- learning rate: 2e-4 (LoRA, QLoRA) or 2e-5 (full) at Llama 2 7B's width (4096) and wider; a narrower model
  gets it times 4096 / width, at most MAX_LR_SCALE times, as smaller models train at larger rates (GPT-3's
  models: 6e-4 at width 768, 1.2e-4 at 4096; muP scales Adam's rate by 1 / width). The demo model (192 wide)
  gets 2e-3: on 32 made-up capitals it recalled 28-32 of 32 over three seeds, against 10-20 at 4096/192's 4.3e-3.

A run shorter than MIN_STEPS optimizer steps, unless --max-steps asked for it, gets a warning naming its numbers
and the flags that lengthen it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llamaforge.finetune.config import DEFAULT_VAL_FRACTION, TrainConfig
from llamaforge.finetune.data import Example, Row, pack_examples, split_examples, unpacked_rows, validation_size

MIN_STEPS = 20  # fewer optimizer steps than this learn nothing worth keeping
MIN_VALIDATION = 10  # records; fewer give a validation loss that is noise
TARGET_EXAMPLES = 4000  # examples a small dataset's default run shows the model (counting repeats)
MAX_EPOCHS = 150
REFERENCE_WIDTH = 4096  # Llama 2 7B's: the width the usual default learning rates are for
MAX_LR_SCALE = 10  # a narrow model's default rate is at most 10x the usual one


@dataclass
class Plan:
    """A run's rows and length, each choice made for it explained in `notes` (with the flag that sets it)."""

    records: int
    tokens: int
    train_rows: list[Row]
    val_rows: list[Row]
    val_fraction: float
    pack: bool
    steps_per_epoch: int
    total_steps: int
    epochs: float
    lr: float
    notes: dict[str, str]  # "validation", "packing", "length", "lr": what the summary says of each
    warning: str | None  # one line when the run has too few optimizer steps to learn anything

    def summary(self) -> str:
        """One line: the data, then what the run does with it and why."""
        return (f"{plural(self.records, 'record')} ({self.tokens:,} tokens): "
                + ", ".join(self.notes[key] for key in ("validation", "packing", "length", "lr")))


def plan_run(config: TrainConfig, examples: list[Example], global_batch: int, width: int,
             rows_of: Callable[[list], list] = unpacked_rows) -> Plan:
    """Split, pack (or not) and size a run of `examples` for a model `width` wide, `global_batch` rows a step;
    unpacked, `rows_of` makes the rows (preference pairs are rows of their own and never packed)."""
    notes: dict[str, str] = {}
    val_fraction = config.val_fraction
    if val_fraction is None:
        held = validation_size(len(examples), DEFAULT_VAL_FRACTION)
        val_fraction = DEFAULT_VAL_FRACTION if held >= MIN_VALIDATION else 0.0
        if not val_fraction:
            notes["validation"] = (f"no validation split ({DEFAULT_VAL_FRACTION:.0%} would be "
                                   f"{plural(held, 'record')}, under {MIN_VALIDATION}; --val-fraction sets it)")
    train, val = split_examples(examples, val_fraction, config.seed)
    notes.setdefault("validation", f"{len(val):,} held out for validation" if val else "no validation split")

    pack, packed = False, []
    if config.pack is not False:
        # Shuffle before packing so a row mixes examples from across the file, the same way every run.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed)).tolist()
        packed = pack_examples([train[i] for i in order], config.seq_len)
        pack = config.pack or math.ceil(len(packed) / global_batch) >= MIN_STEPS
    rows = packed if pack else rows_of(train)
    if pack:
        notes["packing"] = f"packed into {plural(len(rows), 'row')} of up to {config.seq_len} tokens"
    elif config.pack is None:
        notes["packing"] = (f"packing off (packed, they fill {plural(len(packed), 'row')} of {config.seq_len} "
                            f"tokens: {plural(math.ceil(len(packed) / global_batch), 'step')} an epoch; "
                            "--pack sets it)")
    else:
        notes["packing"] = "one record per row"

    steps_per_epoch = math.ceil(len(rows) / global_batch)
    if config.max_steps:
        total_steps = config.max_steps
        epochs = total_steps / steps_per_epoch
        span = f"--max-steps {total_steps:,}"
        notes["length"] = f"{span} = {epochs:.3g} epochs of {global_batch}-row steps"
    else:
        auto = config.epochs is None
        epochs = config.epochs if not auto else max(1, min(MAX_EPOCHS, math.ceil(TARGET_EXAMPLES / len(train))))
        total_steps = math.ceil(epochs * steps_per_epoch)
        span = f"{epochs:g} epoch{'' if epochs == 1 else 's'}"
        notes["length"] = f"{span} = {plural(total_steps, 'step')} of {global_batch} rows"
        if auto and epochs > 1:
            notes["length"] += (f" (small data: at least {TARGET_EXAMPLES:,} examples seen, at most {MAX_EPOCHS} "
                                "epochs; --epochs or --max-steps sets it)")

    warning = None
    if total_steps < MIN_STEPS and not config.max_steps:  # --max-steps asks for that many, knowingly
        fixes = ["raise --epochs or --max-steps"] + (["turn packing off (--no-pack)"] if pack else []) + (
            ["lower --batch-size"] if global_batch > 1 else [])
        warning = (f"warning: {plural(total_steps, 'optimizer step')} {'is' if total_steps == 1 else 'are'} too few "
                   f"to learn anything (it takes {MIN_STEPS} or more): {plural(len(rows), 'row')} of data, "
                   f"{global_batch} rows per step, {span}; " + ", or ".join(fixes))
    lr, notes["lr"] = learning_rate(config.lr, config.method, width)
    return Plan(len(examples), sum(len(e.input_ids) for e in examples), rows, rows_of(val), val_fraction, pack,
                steps_per_epoch, total_steps, epochs, lr, notes, warning)


def learning_rate(requested: float | None, method: str, width: int) -> tuple[float, str]:
    """The peak learning rate (the one asked for, or the default for this method and width) and its note."""
    if requested is not None:
        return requested, f"lr {requested:.2e}"
    usual = 2e-5 if method == "full" else 2e-4
    if width >= REFERENCE_WIDTH:
        return usual, f"lr {usual:.2e}"
    scale = min(MAX_LR_SCALE, REFERENCE_WIDTH / width)
    return usual * scale, (f"lr {usual * scale:.2e} ({usual:.0e} x min({MAX_LR_SCALE}, {REFERENCE_WIDTH}/{width}) "
                           f"for a model {width} wide; --lr sets it)")


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"
