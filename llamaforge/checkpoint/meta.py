"""Meta's download layout: params.json + consolidated.NN.pth (model-parallel shards) + tokenizer.model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from llamaforge.checkpoint.hf import load_torch_file
from llamaforge.checkpoint.inventory import Inventory
from llamaforge.checkpoint.keymaps import META_TO_HF, meta_shard_dim, meta_to_hf, rename
from llamaforge.config import ModelArgs, from_meta_params, read_json
from llamaforge.errors import CheckpointError


def is_meta_dir(path: Path) -> bool:
    return path.is_dir() and (path / "params.json").is_file()


def shard_files(path: Path) -> list[Path]:
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{path} has params.json but no consolidated.NN.pth; finish Meta's download")
    return shards


def read_config(path: Path, shards: list[dict[str, torch.Tensor]]) -> ModelArgs:
    embedding = shards[0].get("tok_embeddings.weight")
    if embedding is None or embedding.ndim != 2:
        raise CheckpointError(f"{shard_files(path)[0]} has no 2-D tok_embeddings.weight; is it a Llama checkpoint?")
    return from_meta_params(read_json(path / "params.json"), embedding.shape[0], path / "params.json")


def read_inventory(path: Path, shards: list[dict[str, torch.Tensor]]) -> Inventory:
    """Every tensor's HF name and shape once merged across shards, from the pickles alone."""
    files = shard_files(path)
    inventory = Inventory(path / "params.json", files)
    for name in shards[0]:
        inventory.add(rename(name, META_TO_HF) or name, merged_shape(name, shards, files), files[0])
    return inventory


def merged_shape(name: str, shards: list[dict[str, torch.Tensor]], files: list[Path]) -> list[int]:
    """The shape of one tensor merged across shards; an error for a shard that lacks it or does not fit."""
    first = shards[0][name].shape
    dim = meta_shard_dim(name)
    dim = dim if dim is not None and dim < len(first) else None
    shape = list(first)
    for shard, file in zip(shards[1:], files[1:], strict=True):
        part = shard.get(name)
        if part is None:
            raise CheckpointError(f"{file} lacks {name}, which {files[0]} holds; the download is incomplete")
        others = [i for i in range(len(first)) if i != dim]  # the dimensions every shard holds whole
        if len(part.shape) != len(first) or any(part.shape[i] != first[i] for i in others):
            raise CheckpointError(f"{file} holds {name} with shape {tuple(part.shape)}, which does not merge with "
                                  f"{tuple(first)} in {files[0]}; the shards are not from one download")
        if dim is not None:
            shape[dim] += part.shape[dim]
    return shape


def open_shards(path: Path) -> list[dict[str, torch.Tensor]]:
    """Every model-parallel shard, memory-mapped: tensors are read only when merged."""
    return [load_torch_file(file) for file in shard_files(path)]


def iter_tensors(config: ModelArgs, shards: list[dict[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors, each merged across shards along the dimension Meta split it."""
    for name in shards[0]:
        parts = [shard[name] for shard in shards]
        dim = meta_shard_dim(name)
        tensor = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
        converted = meta_to_hf(name, tensor, config.n_heads, config.n_kv_heads)
        if converted is not None:
            yield converted

