"""Decode steps through all decoder layers in one C call (decode_layers.c), where the model allows.

`use_fused_decode(model)` checks once that a model fits the fused path (a bfloat16 CPU model whose decoder layers'
linears are int8 / int4 / k-quants or bfloat16, on a CPU with AVX-512 VNNI and BF16, or AVX2) and, if so, sets
`model.fused_decode`, which `generate.Decoder` calls for decode steps (generate's and the engine's) instead of the
layer-by-layer forward. The embedding, the final norm and the output layer stay torch modules. The layers' numbers
are the layer-by-layer forward's to the bit (same kernels; its norms and SwiGLU run decode_layers.c's too), which
the tests check.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from llamaforge.model import KVCache, Llama
from llamaforge.quantize import kernels
from llamaforge.quantize.linear import Bf16Linear, QuantizedLinear


class FusedDecode:
    """Decode steps of `model` (one new token for each of a batch of sequences) with its layers in one C call."""

    def __init__(self, model: Llama) -> None:
        self.model = model
        self.layers: ctypes.Array | None = None  # the weights' addresses, built for `built_for` (see `takes`)
        self.built_for: tuple | None = None
        # `layers` also carries each call's cache addresses: threads decoding with one model take turns.
        self.lock = threading.RLock()

    def __getstate__(self) -> dict:
        """A copy (copy.deepcopy, pickle) keeps its model and rebuilds the addresses for that model's weights."""
        return {"model": self.model}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"])

    def takes(self, token_ids: torch.Tensor, kv_cache: list[KVCache]) -> bool:
        """Whether the kernel can run this step: a cache it can write, with a row per token, and a model that still
        fits (its weights' addresses are rebuilt when they moved or changed dtype or device: `.to()`, a copy)."""
        k, v = kv_cache[0].k, kv_cache[0].v
        if not (token_ids.shape[0] == kv_cache[0].rows_count and k.dtype == torch.bfloat16 and k.device.type == "cpu"
                and k.stride() == v.stride() and k.stride(-1) == 1):
            return False
        model = self.model
        now = (_first_weight(model).data_ptr(), _first_adapters(model), model.dtype, model.device)
        with self.lock:
            if now != self.built_for:
                self.layers = (kernels.Layer * model.config.n_layers)(*map(_layer, model.model.layers)) \
                    if fits_fused_decode(model) else None
                self.built_for = now
            return self.layers is not None

    def __call__(self, token_ids: torch.Tensor, input_pos: torch.Tensor, kv_cache: list[KVCache]) -> torch.Tensor:
        """Logits (B, V) for one new token per row (B,) at positions (B,), written into the cache's rows; only
        where `takes` says so."""
        with self.lock:
            return self._step(token_ids, input_pos, kv_cache)

    def _step(self, token_ids: torch.Tensor, input_pos: torch.Tensor, kv_cache: list[KVCache]) -> torch.Tensor:
        if not self.takes(token_ids, kv_cache):
            raise ValueError("the fused decode layers do not take this model or cache; decode layer by layer")
        model, config = self.model, self.model.config
        positions = input_pos.to(torch.int64).contiguous()
        capacity = kv_cache[0].capacity  # every layer's cache is laid out alike
        if int(positions.min()) < 0 or int(positions.max()) >= capacity:
            raise IndexError(f"positions {positions.tolist()} reach outside the KV cache's {capacity} positions")
        offsets = kv_cache[0].offsets()  # (B, capacity)
        x = model.model.embed_tokens(token_ids[:, None]).contiguous()  # (B, 1, dim)
        cos, sin = model.model.rotary_emb(positions[:, None], int(positions.max()) + 1, x.dtype)  # (B, 1, D) each
        cos, sin = cos.contiguous(), sin.contiguous()
        for layer, cache in zip(self.layers, kv_cache, strict=True):
            layer.k_cache, layer.v_cache = cache.k.data_ptr(), cache.v.data_ptr()
        dims = kernels.Dims(config.dim, config.hidden_dim, config.n_heads, config.n_kv_heads, config.head_dim,
                            kv_cache[0].k.stride(1), config.norm_eps)
        selection = getattr(model, "adapter_selection", None)  # served LoRA adapters (llamaforge/adapters.py)
        slots = None if selection is None or selection.rows is None else selection.slot_ids
        status = kernels.native_decode().decode_layers(
            x.data_ptr(), x.shape[0], self.layers, len(self.layers), ctypes.byref(dims), cos.data_ptr(),
            sin.data_ptr(), positions.data_ptr(), offsets.data_ptr(), offsets.stride(0),
            None if slots is None else slots.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"the fused decode step could not allocate room for {x.shape[0]} rows")
        return model.lm_head(model.model.norm(x[:, 0]))


def fits_fused_decode(model: Llama) -> bool:
    """Whether `model` can decode through decode_layers.c on this machine."""
    config = model.config
    if (kernels.native_decode() is None or model.dtype != torch.bfloat16 or model.device.type != "cpu"
            or config.head_dim % 16 or config.head_dim > 256 or config.n_heads % config.n_kv_heads):
        return False
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        groups = ((attention.q_proj, attention.k_proj, attention.v_proj), (attention.o_proj,),
                  (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,))
        for group in groups:  # each projection one the kernel takes (one call multiplies a group of one scheme)
            if any(_scheme(linear) is None for linear in group) or len(set(map(_adapters_dtype, group))) != 1:
                return False
            if _adapters_dtype(group[0]) not in (None, torch.float32):
                return False
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if any(norm.dtype != torch.bfloat16 or not norm.is_contiguous() for norm in norms):
            return False
    return True


def _base(linear: torch.nn.Module) -> torch.nn.Module:
    """The base layer of a layer serving LoRA adapters (adapters.MultiLoraLinear: the kernel adds their updates);
    any other layer itself (a trained LoraLinear's update must not be dropped, so it does not fit)."""
    return linear.base_layer if getattr(linear, "serves_adapters", False) else linear


def _adapters_dtype(linear: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the LoRA matrices a layer serves (None: it serves none); the kernel takes float32 ones."""
    return linear.lora_A.dtype if getattr(linear, "serves_adapters", False) else None


def _scheme(linear: torch.nn.Module) -> tuple[int, int, str] | None:
    """(bits, group size, kind) of a linear the kernel takes (bits 16: bfloat16 weights), else None."""
    linear = _base(linear)
    if type(linear) is QuantizedLinear:
        return linear.bits, linear.group_size, linear.kind
    if (type(linear) is Bf16Linear and linear.bias is None and linear.weight.dtype == torch.bfloat16
            and linear.weight.is_contiguous()):
        return 16, 0, "int"
    return None


def use_fused_decode(model: Llama) -> bool:
    """Set `model.fused_decode` where the model fits the fused path (see the module's docstring); whether it did.
    Weights replaced in place after this (other than by `.to()` or a copy, which it notices) need a new call."""
    model.fused_decode = FusedDecode(model) if fits_fused_decode(model) else None
    return model.fused_decode is not None


def _first_weight(model: Llama) -> torch.Tensor:
    q_proj = _base(model.model.layers[0].self_attn.q_proj)
    return q_proj.codes if type(q_proj) is QuantizedLinear else q_proj.weight


def _first_adapters(model: Llama) -> int | None:
    """Where the first layer's served LoRA matrices are (None: the model serves none)."""
    q_proj = model.model.layers[0].self_attn.q_proj
    return q_proj.lora_A.data_ptr() if getattr(q_proj, "serves_adapters", False) else None


def _projections(*served: torch.nn.Module) -> kernels.Projections:
    pointers, sizes = kernels._PTR * 3, kernels._INT64 * 3
    linears = tuple(map(_base, served))
    schemes = [_scheme(linear) for linear in linears]
    quantized = [linear if bits != 16 else None for linear, (bits, _, _) in zip(linears, schemes, strict=True)]
    dense = [None if linear is not None else base for linear, base in zip(quantized, linears, strict=True)]
    adapted = [layer for layer in served if getattr(layer, "serves_adapters", False)]  # all or none: see fits
    def addresses(layers: list, tensor: str) -> ctypes.Array:  # each layer's `tensor`, NULL where it has none
        return pointers(*(None if layer is None else getattr(layer, tensor).data_ptr() for layer in layers))

    return kernels.Projections(addresses(quantized, "codes"), addresses(quantized, "scales"),
                               addresses(dense, "weight"),
                               sizes(*(linear.out_features for linear in linears)), len(linears),
                               sizes(*(bits for bits, _, _ in schemes)), sizes(*(group for _, group, _ in schemes)),
                               sizes(*(kernels.KIND_CODES[kind] for _, _, kind in schemes)),
                               pointers(*(layer.lora_A.data_ptr() for layer in adapted)),
                               pointers(*(layer.lora_B.data_ptr() for layer in adapted)),
                               adapted[0].lora_A.shape[1] if adapted else 0)


def _layer(layer: torch.nn.Module) -> kernels.Layer:
    attention, mlp = layer.self_attn, layer.mlp
    return kernels.Layer(_projections(attention.q_proj, attention.k_proj, attention.v_proj),
                         _projections(attention.o_proj), _projections(mlp.gate_proj, mlp.up_proj),
                         _projections(mlp.down_proj), layer.input_layernorm.weight.data_ptr(),
                         layer.post_attention_layernorm.weight.data_ptr(), None, None)
