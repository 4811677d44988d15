"""llama2.c's legacy "version 0" `.bin` checkpoint (layout documented in shared/assets/SOURCES.md)."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from llamaforge.checkpoint.keymaps import meta_to_hf
from llamaforge.config import ModelArgs, reading
from llamaforge.errors import CheckpointError

HEADER = struct.Struct("<7i")  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
KEYS = {"max_seq_len": "seq_len"}  # the header's names where they are not ModelArgs'


def read_header(path: Path) -> tuple[ModelArgs, bool]:
    """The config and whether the classifier is shared with the embedding (positive vocab_size), checked against
    the file's size: the header fixes the size of every array after it."""
    with open(path, "rb") as handle:
        raw = handle.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise CheckpointError(f"{path} is shorter than a llama2.c header ({len(raw)} of {HEADER.size} bytes)")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = HEADER.unpack(raw)
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or vocab_size == 0:
        raise CheckpointError(f"{path} does not start with a llama2.c header (read {HEADER.unpack(raw)})")
    shared = vocab_size > 0
    with reading(f"the header of {path}", KEYS):
        config = ModelArgs(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                           vocab_size=abs(vocab_size), max_seq_len=seq_len, norm_eps=1e-5, tie_word_embeddings=shared)
    expected = HEADER.size + 4 * sum(math.prod(shape) for _, shape in _layout(config, shared))
    actual = path.stat().st_size
    if actual != expected:
        raise CheckpointError(
            f"{path} has {actual} bytes but its header describes {expected}; the file is truncated or not "
            "a llama2.c version-0 checkpoint"
        )
    return config, shared


def _layout(config: ModelArgs, shared: bool) -> list[tuple[str, tuple[int, ...]]]:
    """The float32 arrays after the header, in file order, named like Meta's checkpoint."""
    L, d, h, V = config.n_layers, config.dim, config.hidden_dim, config.vocab_size
    kv = config.n_kv_heads * config.head_dim
    rope_table = config.max_seq_len * config.head_dim // 2
    layout = [
        ("tok_embeddings", (V, d)), ("attention_norm", (L, d)), ("wq", (L, d, d)), ("wk", (L, kv, d)),
        ("wv", (L, kv, d)), ("wo", (L, d, d)), ("ffn_norm", (L, d)), ("w1", (L, h, d)), ("w2", (L, d, h)),
        ("w3", (L, h, d)), ("norm", (d,)), ("freq_cis_real", (rope_table,)), ("freq_cis_imag", (rope_table,)),
    ]
    return layout + ([] if shared else [("output", (V, d))])


_PER_LAYER = {"attention_norm": "attention_norm", "ffn_norm": "ffn_norm", "wq": "attention.wq",
              "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo", "w1": "feed_forward.w1",
              "w2": "feed_forward.w2", "w3": "feed_forward.w3"}


def iter_tensors(path: Path, config: ModelArgs, shared: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors read from the memory-mapped file (whose size `read_header` has checked)."""
    data = np.memmap(path, dtype=np.float32, mode="r", offset=HEADER.size)
    offset = 0
    for name, shape in _layout(config, shared):
        count = math.prod(shape)
        array = torch.from_numpy(np.array(data[offset:offset + count]).reshape(shape))  # owned copy
        offset += count
        if name in _PER_LAYER:
            for layer in range(config.n_layers):
                yield meta_to_hf(f"layers.{layer}.{_PER_LAYER[name]}.weight", array[layer],
                                 config.n_heads, config.n_kv_heads)
        elif not name.startswith("freq_cis"):
            yield meta_to_hf(f"{name}.weight", array, config.n_heads, config.n_kv_heads)
