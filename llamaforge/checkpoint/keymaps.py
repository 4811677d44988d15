"""Plain key maps between checkpoint layouts and the one explicit q/k permutation.

Meta (and llama2.c, which exports Meta's layout) rotate adjacent pairs (2i, 2i+1) of each head;
HF rotates the two halves of each head. Permuting the rows of wq and wk turns one into the other.
"""

from __future__ import annotations

import re

import torch

# Meta name -> HF name; "{}" is the layer index.
META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
}
HF_TO_META = {hf: meta for meta, hf in META_TO_HF.items()}
# GGUF (llama.cpp) name -> Meta name; GGUF keeps Meta's interleaved q/k rows too.
GGUF_TO_META = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{}.attn_q.weight": "layers.{}.attention.wq.weight",
    "blk.{}.attn_k.weight": "layers.{}.attention.wk.weight",
    "blk.{}.attn_v.weight": "layers.{}.attention.wv.weight",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
}
META_TO_GGUF = {meta: gguf for gguf, meta in GGUF_TO_META.items()}

# Along which dimension Meta's model-parallel shards split a tensor (None: replicated in every shard).
# Llama 2's embedding is a ParallelEmbedding, split along the embedding dimension.
META_SHARD_DIM = {
    "tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1,
    "norm": None, "attention_norm": None, "ffn_norm": None,
}

# Buffers some checkpoints carry that the model recomputes.
IGNORED_KEYS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|rope\.freqs)$")


def _template(name: str) -> tuple[str, str | None]:
    match = re.search(r"(layers|blk)\.(\d+)\.", name)
    if match is None:
        return name, None
    return name.replace(match.group(0), match.group(1) + ".{}.", 1), match.group(2)


def rename(name: str, table: dict[str, str]) -> str | None:
    """Map one key through a table of templates; None when the table does not know it."""
    template, layer = _template(name)
    target = table.get(template)
    if target is None:
        return None
    return target.format(layer) if layer is not None else target


def meta_shard_dim(name: str) -> int | None:
    """The dimension Meta's model parallelism split this tensor along (None: replicated or unknown)."""
    parts = name.split(".")
    return META_SHARD_DIM.get(parts[-2]) if len(parts) >= 2 else None


def permute_meta_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder wq/wk rows from interleaved-pair RoPE (Meta) to rotate-half RoPE (HF)."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_hf_to_meta(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_meta_to_hf`."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf(name: str, tensor: torch.Tensor, n_heads: int, n_kv_heads: int) -> tuple[str, torch.Tensor] | None:
    """One Meta tensor as its HF name and layout; None for buffers the model recomputes."""
    if IGNORED_KEYS.search(name):
        return None
    hf_name = rename(name, META_TO_HF)
    if hf_name is None:
        return name, tensor  # left as is: the model's key check reports it
    if hf_name.endswith("q_proj.weight"):
        tensor = permute_meta_to_hf(tensor, n_heads)
    elif hf_name.endswith("k_proj.weight"):
        tensor = permute_meta_to_hf(tensor, n_kv_heads)
    return hf_name, tensor
