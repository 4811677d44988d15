"""Quantized checkpoints: an HF folder whose linear layers are stored as int8 / int4 codes, loaded as they are.

`llamaforge quantize` writes one; `load` reads it back without quantizing anything again. The folder is an
HF checkpoint (config.json, safetensors shards, tokenizer files) with two differences:

- each quantized linear `X` stores `X.codes` (uint8) and `X.scales` (float16) instead of `X.weight`, in the
  stored layout of llamaforge/quantize/formats.py (row-major, rows padded to 128 weights; int4 two codes per
  byte), which loading repacks for the kernel;
- config.json has `"quantization_config": {"quant_method": "llamaforge", "format_version": 1, "mode": ...,
  "layers": {"X": {"bits": 8 | 4, "group_size": G}, ...}}`, G being the weights per scale along a row; a layer
  holding llama.cpp's Q4_K numbers (loaded from a GGUF) has `"kind": "q4_k"` (bits 4, G 32) and its scales are
  bytes, each 256 weights' d and dmin (float16) and 8 six-bit scales and mins; one holding Q6_K's `"kind": "q6_k"`
  (bits 6, G 16), its scales each 256 weights' d (float16) and 16 int8 scales; Q5_K's `"kind": "q5_k"` (bits 5,
  G 32), its scales as Q4_K's (formats.py's stored layout).

transformers does not read this format (its quant_method is not one it knows); llamaforge does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from llamaforge.checkpoint.inventory import Inventory, expected_shapes
from llamaforge.config import ModelArgs
from llamaforge.errors import CheckpointError
from llamaforge.quantize import QuantizedLinear, QuantizedWeight, kernels
from llamaforge.quantize.formats import (
    K_QUANT_SCHEMES,
    KINDS,
    STORED_Q4_K_BYTES,
    STORED_Q6_K_BYTES,
    SUPER_BLOCK,
    stored_width,
)

METHOD = "llamaforge"
FORMAT_VERSION = 1


def quantization_config(model: torch.nn.Module, mode: str) -> dict:
    """The config.json entry describing `model`'s quantized layers."""
    layers = {name: {"bits": m.bits, "group_size": m.group_size} | ({"kind": m.kind} if m.kind != "int" else {})
              for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    return {"quant_method": METHOD, "format_version": FORMAT_VERSION, "mode": mode, "layers": layers}


def quantized_layers(path: Path) -> dict[str, dict] | None:
    """The layers map of an HF folder quantized by llamaforge; None for an ordinary checkpoint."""
    try:
        quantization = json.loads((path / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # read_config reports what is wrong with config.json
    if not isinstance(quantization, dict):
        return None
    if quantization.get("quant_method") != METHOD:
        raise CheckpointError(f"{path} is quantized with {quantization.get('quant_method')!r}, which llamaforge "
                              "does not read; load the unquantized weights (llamaforge can quantize them itself: "
                              "--quantize int8|int4)")
    if quantization.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is a llamaforge quantized checkpoint of format version "
                              f"{quantization.get('format_version')}; this llamaforge reads version {FORMAT_VERSION}")
    return quantization["layers"]


def check_inventory(config: ModelArgs, inventory: Inventory, layers: dict[str, dict]) -> None:
    """Check each quantized layer's codes and scales against the config, then stand them in for its weight,
    so the ordinary check (inventory.check) sees the dense checkpoint's names and shapes."""
    dense = expected_shapes(config)
    for layer, scheme in layers.items():
        weight = f"{layer}.weight"
        if weight not in dense:
            raise CheckpointError(f"{inventory.config_file} quantizes {layer}, which a Llama model does not have")
        N, K = dense[weight]
        bits, group, kind = scheme.get("bits"), scheme.get("group_size"), scheme.get("kind", "int")
        if kind not in KINDS:
            raise CheckpointError(f"{inventory.config_file}: layer {layer} has kind={kind!r}; expected one of "
                                  f"{', '.join(KINDS)}")
        if kind == "int" and (bits not in (8, 4) or not isinstance(group, int) or group < 1):
            raise CheckpointError(f"{inventory.config_file}: layer {layer} has bits={bits}, group_size={group}; "
                                  "expected bits 8 or 4 and a positive group size")
        if kind != "int" and (bits, group, K % SUPER_BLOCK) != (*K_QUANT_SCHEMES[kind], 0):
            raise CheckpointError(f"{inventory.config_file}: layer {layer} of kind {kind} has bits={bits}, "
                                  f"group_size={group} and {K} inputs; {kind} has bits and group size "
                                  f"{K_QUANT_SCHEMES[kind]} and a multiple of {SUPER_BLOCK} inputs")
        per_super = STORED_Q6_K_BYTES if kind == "q6_k" else STORED_Q4_K_BYTES
        scales = (N, -(-K // group)) if kind == "int" else (N, K // SUPER_BLOCK * per_super)
        expected = {f"{layer}.codes": (N, stored_width(K) * bits // 8), f"{layer}.scales": scales}
        for name, shape in expected.items():
            found = inventory.shapes.pop(name, None)
            if found != shape:
                raise CheckpointError(f"{inventory.weights('holds')} {name} with shape {found}, but {layer} "
                                      f"({N} x {K}, {bits} bits, groups of {group}) needs {shape}; the files "
                                      "and config.json do not belong together")
            inventory.files.pop(name, None)
        inventory.shapes[weight] = (N, K)


def group_tensors(tensors: Iterable[tuple[str, torch.Tensor]], layers: dict[str, dict],
                  in_features: dict[str, int]) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """Pass tensors through, but join each quantized layer's codes and scales into one QuantizedWeight (named
    like the weight it stands for) as soon as both have arrived."""
    waiting: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        layer, _, part = name.rpartition(".")
        if layer not in layers or part not in ("codes", "scales"):
            yield name, tensor
            continue
        parts = waiting.setdefault(layer, {})
        parts[part] = tensor
        if len(parts) == 2:
            del waiting[layer]
            scheme = layers[layer]
            yield f"{layer}.weight", kernels.repack_stored(parts["codes"], parts["scales"], scheme["bits"],
                                                           scheme["group_size"], in_features[layer],
                                                           scheme.get("kind", "int"))


def in_features_of(config: ModelArgs, layers: dict[str, dict]) -> dict[str, int]:
    """Each quantized layer's input width, from the config."""
    dense = expected_shapes(config)
    return {layer: dense[f"{layer}.weight"][1] for layer in layers}
