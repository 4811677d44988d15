"""Meta's download layout: params.json + consolidated.NN.pth (model-parallel shards) + tokenizer.model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from llamaforge.checkpoint.hf import load_torch_file
from llamaforge.checkpoint.keymaps import meta_shard_dim, meta_to_hf
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
    if embedding is None:
        raise CheckpointError(f"{shard_files(path)[0]} has no tok_embeddings.weight; is it a Llama checkpoint?")
    return from_meta_params(read_json(path / "params.json"), vocab_size=embedding.shape[0])


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

