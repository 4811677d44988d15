"""4-bit NormalFloat (NF4) weight quantization with double quantization, for QLoRA.

References: Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (the NF4 data type and
double quantization), and bitsandbytes' `quantize_4bit(quant_type="nf4")` (the exact format followed here).

Written in plain PyTorch, with no CUDA kernels, so QLoRA fine-tuning and 4-bit inference run on a laptop
CPU as on a GPU, and the arithmetic can be read and tested. The format is bitsandbytes': the same 16-value
NF4 codebook, blocks of 64 weights each scaled by its absmax, codes matched to the nearest codebook value,
two codes per byte with the first in the high nibble. `quantize_nf4_blockwise` equals bitsandbytes'
`quantize_4bit(..., quant_type="nf4", compress_statistics=False)` code for code.

Double quantization then shrinks the per-block scales from 32 to about 8 bits each (0.5 -> 0.127 bits
per weight of overhead): subtract their mean (absmaxes are all positive, so centring doubles the
resolution) and store them as symmetric int8 with one float32 scale per 256 of them. bitsandbytes uses
its dynamic 8-bit code there instead of int8, so its `compress_statistics=True` bytes differ from ours.

`NF4Linear` is a frozen linear over such a weight. Its backward dequantizes the weight again instead of
saving a dense copy, which is what keeps QLoRA's activation memory at the 4-bit size of the base model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# bitsandbytes' NF4 table: quantiles of N(0, 1) normalised to [-1, 1], asymmetric so that 0 is exact.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # (16,) float32
# Nearest codebook value = bucket between midpoints; a value on a midpoint goes to the lower code, as
# argmin's first-index rule does in bitsandbytes.
_NF4_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2  # (15,)
# Byte b -> (code[b >> 4], code[b & 15]): dequantizing looks up whole bytes, so codes are never unpacked.
_NF4_BYTE_TABLE = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)  # (256, 2)


@lru_cache
def _on_device(table: str, device: torch.device) -> torch.Tensor:
    # One copy per device, made once: a host-to-device copy in every forward would stall the GPU stream.
    return {"midpoints": _NF4_MIDPOINTS, "byte_table": _NF4_BYTE_TABLE}[table].to(device)


# Blocks quantized per step: keeps the temporaries to ~32 MB whatever the size of the matrix (70B: 235M weights).
_CHUNK_BLOCKS = 1 << 16


@dataclass
class NF4Weight:
    """A weight in NF4 with double-quantized block scales, and what is needed to rebuild it."""

    packed: torch.Tensor  # (numel // 2,) uint8: two 4-bit codebook indices per byte, first one high
    absmax_codes: torch.Tensor  # (n_blocks,) int8: each block's absmax, minus the mean, in units of its scale
    absmax_scales: torch.Tensor  # (ceil(n_blocks / scale_block_size),) float32
    absmax_mean: torch.Tensor  # () float32
    shape: torch.Size
    dtype: torch.dtype
    block_size: int = 64
    scale_block_size: int = 256

    def layout(self) -> dict[str, Any]:
        """The non-tensor fields, to rebuild the weight around the same (e.g. moved) tensors."""
        return {"shape": self.shape, "dtype": self.dtype, "block_size": self.block_size,
                "scale_block_size": self.scale_block_size}


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack an even number of 4-bit codes (uint8, 0..15) two per byte, the first in the high nibble."""
    codes = codes.reshape(-1)
    return codes[0::2] << 4 | codes[1::2]  # (numel // 2,)


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """The codes `pack_4bit` packed, flat (uint8, 0..15)."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)  # (2 * numel,)


def quantize_nf4_blockwise(weight: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed NF4 codes (uint8) and float32 per-block absmax of `weight`, as bitsandbytes stores them."""
    if block_size % 2:
        raise ValueError(f"the NF4 block size must be even (two codes fill a byte), got {block_size}")
    if weight.numel() % block_size:
        raise ValueError(f"cannot quantize a weight of shape {tuple(weight.shape)} to NF4: its {weight.numel()} "
                         f"elements are not a multiple of the block size {block_size}")
    blocks = weight.detach().reshape(-1, block_size)  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1).float()  # (n_blocks,)
    # An all-zero block has absmax 0: scale it by 0, not 1/0, so its codes are NF4's exact zero, not NaN.
    inverse = torch.where(absmax > 0, 1 / absmax, torch.zeros_like(absmax))  # (n_blocks,)
    midpoints = _on_device("midpoints", weight.device)
    codes = torch.empty(blocks.shape, dtype=torch.uint8, device=weight.device)  # (n_blocks, block_size)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        chunk = slice(start, start + _CHUNK_BLOCKS)
        # Multiply by the reciprocal, as bitsandbytes does, so values near a midpoint round the same way.
        scaled = (blocks[chunk].float() * inverse[chunk, None]).clamp_(-1, 1)
        codes[chunk] = torch.bucketize(scaled, midpoints, out_int32=True)
    return pack_4bit(codes), absmax


def dequantize_nf4_blockwise(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...],
                             dtype: torch.dtype = torch.float32, block_size: int = 64) -> torch.Tensor:
    """The dense weight of `shape` from packed NF4 codes and float32 per-block absmax."""
    values = _on_device("byte_table", packed.device)[packed.int()]  # (numel // 2, 2) float32
    weight = values.view(-1, block_size) * absmax.float()[:, None]  # (n_blocks, block_size)
    return weight.to(dtype).view(shape)


def _double_quantize(absmax: torch.Tensor, scale_block_size: int) -> tuple[torch.Tensor, ...]:
    """int8 codes, float32 per-group scales and the float32 mean of the block scales `absmax` (n_blocks,)."""
    mean = absmax.mean()
    centred = absmax - mean  # (n_blocks,)
    # Zero-pad to whole groups: zeros change no group's absmax, and their codes are cut off again below.
    padding = -absmax.numel() % scale_block_size
    groups = F.pad(centred, (0, padding)).view(-1, scale_block_size)  # (n_groups, scale_block_size)
    scales = groups.abs().amax(dim=1) / 127  # (n_groups,)
    safe_scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (groups / safe_scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return codes.view(-1)[: absmax.numel()], scales, mean


def _double_dequantize(q: NF4Weight) -> torch.Tensor:
    """The per-block scales (n_blocks,) float32 of `q`, from their int8 codes."""
    scales = q.absmax_scales.repeat_interleave(q.scale_block_size)[: q.absmax_codes.numel()]  # (n_blocks,)
    return q.absmax_codes.float() * scales + q.absmax_mean


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, scale_block_size: int = 256) -> NF4Weight:
    """Quantize `weight` to NF4 in blocks of `block_size`, with its block scales double-quantized."""
    packed, absmax = quantize_nf4_blockwise(weight, block_size)
    codes, scales, mean = _double_quantize(absmax, scale_block_size)
    return NF4Weight(packed, codes, scales, mean, weight.shape, weight.dtype, block_size, scale_block_size)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight of `q`, in `dtype` (default: the dtype it was quantized from)."""
    return dequantize_nf4_blockwise(q.packed, _double_dequantize(q), q.shape, dtype or q.dtype, q.block_size)


class _NF4LinearFunction(torch.autograd.Function):
    """x @ W.T for a frozen NF4 weight W, saving only the 4-bit tensors for backward, never W itself."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
        ctx.save_for_backward(weight.packed, weight.absmax_codes, weight.absmax_scales, weight.absmax_mean)
        ctx.layout = weight.layout()
        return F.linear(x, dequantize_nf4(weight, x.dtype))  # (..., out_features)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        weight = NF4Weight(*ctx.saved_tensors, **ctx.layout)
        # The weight is frozen: only the input gets a gradient, dL/dx = dL/dy @ W.
        return grad_output @ dequantize_nf4(weight, grad_output.dtype), None  # (..., in_features)


class NF4Linear(nn.Module):
    """A frozen, bias-free linear layer whose weight is stored in NF4 (QLoRA's base layer)."""

    def __init__(self, weight: NF4Weight, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D (out_features, in_features) weight, got shape "
                             f"{tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = weight.dtype
        self.block_size = weight.block_size
        self.scale_block_size = weight.scale_block_size
        self.compute_dtype = compute_dtype  # None: compute in the input's dtype
        # Buffers, not parameters: `.to(device)` moves them, `state_dict` saves them, optimizers skip them.
        self.register_buffer("packed", weight.packed)
        self.register_buffer("absmax_codes", weight.absmax_codes)
        self.register_buffer("absmax_scales", weight.absmax_scales)
        self.register_buffer("absmax_mean", weight.absmax_mean)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> NF4Linear:
        """Quantize a bias-free `nn.Linear`'s weight into a new NF4Linear."""
        if linear.bias is not None:
            raise ValueError(f"NF4Linear has no bias; cannot quantize {linear} (Llama's linears have none)")
        with torch.no_grad():
            return cls(quantize_nf4(linear.weight), compute_dtype)

    @property
    def nf4_weight(self) -> NF4Weight:
        """The quantized weight, viewing this module's buffers."""
        return NF4Weight(self.packed, self.absmax_codes, self.absmax_scales, self.absmax_mean,
                         torch.Size((self.out_features, self.in_features)), self.weight_dtype, self.block_size,
                         self.scale_block_size)

    def dequantize(self) -> torch.Tensor:
        """The dense (out_features, in_features) weight in `weight_dtype`, e.g. to merge adapters into."""
        return dequantize_nf4(self.nf4_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute_dtype = self.compute_dtype or x.dtype
        return _NF4LinearFunction.apply(x.to(compute_dtype), self.nf4_weight).to(x.dtype)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> NF4Linear:
        # `Module.to(dtype)`, `.half()` etc. cast every floating buffer, which would round the float32
        # scale statistics to 16 bits. Keep them float32 (moving them to the new device only), and let
        # the dtype conversion change the dtype the weight dequantizes to, as it would a dense weight.
        statistics = {"absmax_scales": self.absmax_scales, "absmax_mean": self.absmax_mean}
        self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype, device=self.packed.device)).dtype
        super()._apply(fn, recurse)
        for name, before in statistics.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"weight_dtype={self.weight_dtype}, compute_dtype={self.compute_dtype}")


def quantize_linears_nf4(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace, in place, every nn.Linear whose qualified name does not end with an entry of `skip` by NF4Linear."""

    def skipped(name: str) -> bool:
        # Match whole name components: "lm_head" skips "lm_head" and "x.lm_head", not "my_lm_head".
        return any(name == suffix or name.endswith("." + suffix) for suffix in skip)

    targets = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and not skipped(name)]
    for name in targets:
        # Swapping one layer at a time frees each dense weight as soon as its 4-bit copy exists, so the peak
        # is the 4-bit model plus one dense layer, never two full copies.
        model.set_submodule(name, NF4Linear.from_linear(model.get_submodule(name)))
    return model
