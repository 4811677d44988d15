"""What a checkpoint holds, read from its headers alone, and the check of its config against that.

The model is built from the config, so a config.json claiming 2**30 layers would cost minutes of building
modules before the first tensor showed the mismatch. Every format lists its tensors' names and shapes
ahead of the data (the safetensors and GGUF headers, the pickle of a torch.save'd file), so the config is
checked against those first: names, shapes and the layer count, for the price of reading the headers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llamaforge.checkpoint.keymaps import IGNORED_KEYS
from llamaforge.config import ModelArgs
from llamaforge.errors import CheckpointError
from llamaforge.model import Llama

LAYER = re.compile(r"^model\.layers\.(\d+)\.")
FIX = "use the config file that came with them"


@dataclass
class Inventory:
    """Each tensor a checkpoint holds, by HF name: its shape and its file; and the file the config came from."""

    config_file: Path
    weight_files: list[Path]
    keys: Mapping[str, str] = field(default_factory=dict)  # ModelArgs field -> the config file's key for it
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def add(self, name: str, shape: Iterable[int], file: Path) -> None:
        """Record one tensor; buffers the model recomputes are left out, as loading leaves them out."""
        if not IGNORED_KEYS.search(name):
            self.shapes[name] = tuple(int(n) for n in shape)
            self.files[name] = file

    def weights(self, verb: str) -> str:
        """The weight files as a sentence's subject with `verb` agreeing: "X holds", "the 3 weight files in D hold"."""
        if len(self.weight_files) == 1:
            return f"{self.weight_files[0]} {verb}"
        return f"the {len(self.weight_files)} weight files in {self.weight_files[0].parent} {verb.removesuffix('s')}"


def check(config: ModelArgs, inventory: Inventory) -> None:
    """Refuse a config that does not describe the tensors the checkpoint holds, before any model is built."""
    check_layers(config, inventory)
    expected = expected_shapes(config)  # as many names as the checkpoint's own layers give: bounded by its size
    unexpected = [name for name in inventory.shapes if name not in expected]
    if unexpected == ["score.weight"]:  # transformers' LlamaForSequenceClassification: a reward model
        raise CheckpointError(f"{inventory.weights('holds')} a reward model (score.weight: one number, no vocabulary "
                              "to generate from); use it with `llamaforge score --reward-model` or `llamaforge sample "
                              "--reward-model`")
    if unexpected:
        raise CheckpointError(f"{inventory.weights('holds')} tensors a Llama model does not: "
                              f"{', '.join(unexpected[:5])}; it is not a Llama 2 checkpoint")
    for name, shape in inventory.shapes.items():
        if shape != expected[name]:
            raise CheckpointError(
                f"tensor {name} has shape {shape} but the config asks for {expected[name]}: {inventory.config_file} "
                f"does not match the weights in {inventory.files[name]}; {FIX}"
            )
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [name for name in expected if name not in inventory.shapes and name not in optional]
    if missing:
        raise CheckpointError(
            f"{inventory.weights('lacks')} {len(missing)} tensors the model needs, e.g. {', '.join(missing[:3])}; "
            "the download is incomplete or it is not a Llama checkpoint"
        )


def check_layers(config: ModelArgs, inventory: Inventory) -> None:
    """The config's layer count must be the checkpoint's: layers 0 to n_layers - 1, each present."""
    layers = {int(match.group(1)) for name in inventory.shapes if (match := LAYER.match(name))}
    # n distinct indices whose largest is n - 1 are exactly 0..n-1, checked without counting to n.
    if len(layers) == config.n_layers and max(layers, default=-1) == config.n_layers - 1:
        return
    if not layers:
        held = "no decoder layers"
    elif len(layers) == max(layers) + 1:
        held = f"layers 0-{max(layers)}" if layers != {0} else "layer 0"
    else:
        held = f"{len(layers)} decoder layers numbered {min(layers)} to {max(layers)}"
    raise CheckpointError(
        f"{inventory.config_file} says {inventory.keys.get('n_layers', 'n_layers')}={config.n_layers} but "
        f"{inventory.weights('holds')} {held}; the config does not match the weights ({FIX})"
    )


def expected_shapes(config: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the model `config` describes, from a one-layer copy on the meta device."""
    with torch.device("meta"):
        template = {name: tuple(t.shape) for name, t in Llama(config.replace(n_layers=1)).state_dict().items()}
    shapes = {name: shape for name, shape in template.items() if not LAYER.match(name)}
    for layer in range(config.n_layers):
        shapes |= {LAYER.sub(f"model.layers.{layer}.", name): shape
                   for name, shape in template.items() if LAYER.match(name)}
    return shapes
