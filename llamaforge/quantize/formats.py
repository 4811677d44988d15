"""Weight-only int8 and int4 formats: quantize a weight, pack it for the kernel, rebuild it, repack GGUF blocks.

Both are symmetric with one float16 scale per `group_size` weights of a row, the rules of llama.cpp's Q8_0 and
Q4_0 (ggml-quants.c `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref`), so that with groups of 32 a weight
quantizes to exactly the codes llama.cpp's quantizer writes, and a Q8_0 / Q4_0 GGUF tensor repacks into this
layout without rounding anything again:

- int8: scale = absmax / 127, value = round(w / scale) in [-127, 127], halves away from zero; stored as
  value + 128 (uint8).
- int4: scale = -(the signed value of largest magnitude) / 8, value = floor(w / scale + 8.5) - 8 clamped to
  [-8, 7], so the largest magnitude lands exactly on -8; stored as value + 8, two per byte.

Layout, what `qlinear.c` reads: rows are padded with zero values to a multiple of 128 weights (so any width
works, and a group that does not divide the width simply ends early). int4 packs each run of 128 weights into
64 bytes, weight i in the low nibble of byte i and weight 64 + i in the high nibble: one 64-byte load then
holds two 64-weight runs that a mask and a shift separate. `group_size` None (or >= the width) means one
scale per row, the usual int8 choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)  # int4's choices; int8 is per row unless a group is asked for
PAD_TO = 128  # row width multiple the kernel works in
BIAS = {8: 128, 4: 8}  # stored code = value + bias
GGUF_BLOCK = 32  # weights per Q8_0 / Q4_0 block


@dataclass
class QuantizedWeight:
    """An (out_features, in_features) weight as integer codes and float16 group scales."""

    codes: torch.Tensor  # (N, Kp) uint8 for 8 bits, (N, Kp / 2) for 4 bits
    scales: torch.Tensor  # (N, n_groups) float16
    bits: int
    group_size: int  # weights per scale along a row; the whole row for per-row scales
    in_features: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes


def padded_width(in_features: int) -> int:
    """The row width the kernel stores: in_features rounded up to a multiple of 128."""
    return -(-in_features // PAD_TO) * PAD_TO


def check_scheme(bits: int, group_size: int | None) -> None:
    """Refuse a bit width or group size the kernel does not have, naming the choices."""
    if bits not in BITS:
        raise ValueError(f"int{bits} is not a weight format here; use int8 or int4")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise ValueError(f"group size {group_size} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}"
                         + (" (or none for int8's one scale per row)" if bits == 8 else ""))


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None = None) -> QuantizedWeight:
    """Quantize a 2-D float weight (N, K) to `bits` with one scale per `group_size` weights (None: per row)."""
    check_scheme(bits, group_size)
    if bits == 4 and group_size is None:
        group_size = GROUP_SIZES[0]
    N, K = weight.shape
    group = min(group_size or K, K)
    n_groups = -(-K // group)
    w = weight.detach().float()
    padded = torch.nn.functional.pad(w, (0, n_groups * group - K)).view(N, n_groups, group)
    if bits == 8:
        scale = padded.abs().amax(dim=-1) / 127  # (N, n_groups)
    else:
        # The signed value of largest magnitude, divided by -8: it quantizes to exactly -8.
        index = padded.abs().argmax(dim=-1, keepdim=True)
        scale = padded.gather(-1, index).squeeze(-1) / -8
    inverse = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
    scaled = padded * inverse[..., None]
    if bits == 8:  # llama.cpp's roundf: halves away from zero (written as gguf-py writes it, exact near halves)
        magnitude = scaled.abs()
        whole = magnitude.floor()
        values = (whole + (2 * (magnitude - whole)).floor()).copysign_(scaled).clamp_(-127, 127)
    else:  # llama.cpp: (int8_t)(x + 8.5f), a truncation that is a floor here since x + 8.5 > 0
        values = (scaled + 8.5).floor().clamp_(0, 15) - 8
    values = values.view(N, -1)[:, :K].to(torch.int16)
    codes = pack_codes(values + BIAS[bits], bits)
    return QuantizedWeight(codes, scale.to(torch.float16), bits, group, K)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (N, K) in [0, 2**bits) into the kernel's layout: padded to 128 with zero values, int4 two per byte."""
    N, K = codes.shape
    padded = torch.full((N, padded_width(K)), BIAS[bits], dtype=torch.uint8)
    padded[:, :K] = codes.to(torch.uint8)
    if bits == 8:
        return padded
    runs = padded.view(N, -1, 2, 64)  # (N, Kp / 128, low / high half, 64)
    return (runs[:, :, 0] | runs[:, :, 1] << 4).reshape(N, -1)  # (N, Kp / 2)


def unpack_codes(q: QuantizedWeight) -> torch.Tensor:
    """The stored codes (N, K) as int16 values, the bias removed: the inverse of `pack_codes`."""
    N = q.out_features
    if q.bits == 8:
        codes = q.codes.to(torch.int16)
    else:
        runs = q.codes.view(N, -1, 1, 64)
        codes = torch.cat([runs & 0x0F, runs >> 4], dim=2).reshape(N, -1).to(torch.int16)
    return codes[:, :q.in_features] - BIAS[q.bits]


def dequantize_weight(q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight (N, K) the codes stand for, in `dtype` (computed in float32, then cast)."""
    values = unpack_codes(q).float()
    scales = q.scales.float().repeat_interleave(q.group_size, dim=1)[:, :q.in_features]
    return (values * scales).to(dtype)


def from_gguf_blocks(blocks: torch.Tensor, bits: int, shape: tuple[int, int]) -> QuantizedWeight:
    """A GGUF Q8_0 (bits=8) or Q4_0 (bits=4) tensor's raw bytes as a QuantizedWeight, with no rounding.

    Q8_0 blocks are a float16 scale then 32 int8 values (34 bytes); Q4_0 blocks a float16 scale then 16
    bytes holding value j + 8 in the low nibble of byte j and value 16 + j + 8 in the high nibble (18 bytes).
    """
    N, K = shape
    per_block = 2 + GGUF_BLOCK * bits // 8
    raw = blocks.reshape(N, K // GGUF_BLOCK, per_block)
    scales = raw[..., :2].contiguous().view(torch.float16).reshape(N, -1)  # (N, K / 32)
    payload = raw[..., 2:]
    if bits == 8:
        codes = payload.contiguous().view(torch.int8).to(torch.int16) + BIAS[8]
    else:
        codes = torch.cat([payload & 0x0F, payload >> 4], dim=-1).to(torch.int16)  # (N, K / 32, 32)
    return QuantizedWeight(pack_codes(codes.reshape(N, K), bits), scales, bits, GGUF_BLOCK, K)
