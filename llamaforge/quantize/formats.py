"""Weight-only int8 and int4 formats: quantize a weight, pack it for the kernel, rebuild it, repack GGUF blocks.

Both are symmetric with one float16 scale per `group_size` weights of a row, the rules of llama.cpp's Q8_0 and
Q4_0 (ggml-quants.c `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref`), so that with groups of 32 a weight
quantizes to exactly the codes llama.cpp's quantizer writes, and a Q8_0 / Q4_0 GGUF tensor repacks into this
layout without rounding anything again:

- int8: scale = absmax / 127, value = round(w / scale) in [-127, 127], halves away from zero; stored as
  value + 128 (uint8).
- int4: scale = -(the signed value of largest magnitude) / 8, value = floor(w / scale + 8.5) - 8 clamped to
  [-8, 7], so the largest magnitude lands exactly on -8; stored as value + 8, two per byte.

Two layouts of the same codes and scales:

- the kernel's (`QuantizedWeight`, what `qlinear.c` reads): rows interleaved in tiles of 16 and weights in
  blocks of 32, so one 64-byte vector holds 4 consecutive codes of 16 rows (qlinear.c describes it byte by
  byte); the scales tiled alike, (tiles, n_groups, 16). Rows past the last and weights past the width are zero
  values in whole tiles and blocks.
- the stored one (`stored_codes` / `from_stored`: quantized checkpoints, checkpoint/quantized.py): row-major,
  rows padded with zero values to a multiple of 128 weights; int4 packs each run of 128 weights of a row into
  64 bytes, weight i in the low nibble of byte i and weight 64 + i in the high nibble; scales (N, n_groups).
  It does not depend on the kernel, which may change its tiling without changing the files.

`group_size` None (or >= the width) means one scale per row, the usual int8 choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)  # int4's choices; int8 is per row unless a group is asked for
BIAS = {8: 128, 4: 8}  # stored code = value + bias
BLOCK = 32  # weights per block in the kernel's layout; also per Q8_0 / Q4_0 block in GGUF
TILE = 16  # rows interleaved in the kernel's layout
STORED_PAD = 128  # row width multiple of the stored layout


@dataclass
class QuantizedWeight:
    """An (out_features, in_features) weight as integer codes and float16 group scales, in the kernel's layout."""

    codes: torch.Tensor  # (tiles, blocks, 512) uint8 for 8 bits, (tiles, blocks, 256) for 4 bits
    scales: torch.Tensor  # (tiles, n_groups, 16) float16
    bits: int
    group_size: int  # weights per scale along a row; the whole row for per-row scales
    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def row_scales(self) -> torch.Tensor:
        """The scales as (out_features, n_groups) float16."""
        return self.scales.transpose(1, 2).reshape(-1, self.scales.shape[1])[:self.out_features]


def stored_width(in_features: int) -> int:
    """The row width of the stored layout: in_features rounded up to a multiple of 128."""
    return -(-in_features // STORED_PAD) * STORED_PAD


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
    return pack(values.view(N, -1)[:, :K].to(torch.int16), scale.to(torch.float16), bits, group)


def pack(values: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Signed values (N, K) and float16 scales (N, n_groups) in the kernel's layout (see qlinear.c)."""
    N, K = values.shape
    tiles, blocks = -(-N // TILE), -(-K // BLOCK)
    codes = torch.full((tiles * TILE, blocks * BLOCK), BIAS[bits], dtype=torch.uint8, device=values.device)
    codes[:N, :K] = (values + BIAS[bits]).to(torch.uint8)
    if bits == 8:  # [tile, row, block, vector, byte] -> [tile, block, vector, row, byte]
        codes = codes.view(tiles, TILE, blocks, 8, 4).permute(0, 2, 3, 1, 4)
    else:  # [tile, row, block, half, vector, byte] -> [tile, block, half, vector, row, byte]; halves to nibbles
        halves = codes.view(tiles, TILE, blocks, 2, 4, 4).permute(0, 2, 3, 4, 1, 5)
        codes = halves[:, :, 0] | halves[:, :, 1] << 4
    tiled_scales = torch.zeros(tiles * TILE, scales.shape[1], dtype=torch.float16, device=scales.device)
    tiled_scales[:N] = scales
    return QuantizedWeight(codes.reshape(tiles, blocks, -1).contiguous(),
                           tiled_scales.view(tiles, TILE, -1).transpose(1, 2).contiguous(), bits, group_size, K, N)


def unpack_codes(q: QuantizedWeight) -> torch.Tensor:
    """The signed values (N, K) as int16: the inverse of `pack`."""
    tiles, blocks, _ = q.codes.shape
    if q.bits == 8:
        rows = q.codes.view(tiles, blocks, 8, TILE, 4).permute(0, 3, 1, 2, 4)  # [tile, row, block, vector, byte]
    else:
        packed = q.codes.view(tiles, blocks, 1, 4, TILE, 4)
        halves = torch.cat([packed & 0x0F, packed >> 4], dim=2)  # [tile, block, half, vector, row, byte]
        rows = halves.permute(0, 4, 1, 2, 3, 5)
    values = rows.reshape(tiles * TILE, blocks * BLOCK)[:q.out_features, :q.in_features]
    return values.to(torch.int16) - BIAS[q.bits]


def dequantize_weight(q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight (N, K) the codes stand for, in `dtype` (computed in float32, then cast)."""
    values = unpack_codes(q).float()
    scales = q.row_scales().float().repeat_interleave(q.group_size, dim=1)[:, :q.in_features]
    return (values * scales).to(dtype)


def stored_codes(q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes and scales in the stored (checkpoint) layout: (N, Kp) or (N, Kp / 2) uint8, (N, n_groups)."""
    N, K = q.out_features, q.in_features
    padded = torch.full((N, stored_width(K)), BIAS[q.bits], dtype=torch.uint8, device=q.codes.device)
    padded[:, :K] = (unpack_codes(q) + BIAS[q.bits]).to(torch.uint8)
    if q.bits == 4:
        runs = padded.view(N, -1, 2, 64)  # (N, Kp / 128, low / high half, 64)
        padded = (runs[:, :, 0] | runs[:, :, 1] << 4).reshape(N, -1)
    return padded, q.row_scales().contiguous()


def from_stored(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                in_features: int) -> QuantizedWeight:
    """A weight from the stored layout (`stored_codes`), repacked for the kernel."""
    N = codes.shape[0]
    if bits == 4:
        runs = codes.view(N, -1, 1, 64)
        codes = torch.cat([runs & 0x0F, runs >> 4], dim=2).reshape(N, -1)
    return pack(codes[:, :in_features].to(torch.int16) - BIAS[bits], scales, bits, group_size)


def from_gguf_blocks(blocks: torch.Tensor, bits: int, shape: tuple[int, int],
                     row_order: torch.Tensor | None = None) -> QuantizedWeight:
    """A GGUF Q8_0 (bits=8) or Q4_0 (bits=4) tensor's raw bytes as a QuantizedWeight, with no rounding.

    Q8_0 blocks are a float16 scale then 32 int8 values (34 bytes); Q4_0 blocks a float16 scale then 16
    bytes holding value j + 8 in the low nibble of byte j and value 16 + j + 8 in the high nibble (18 bytes).
    `row_order` (N,) takes the rows in that order (Meta's q / k row order to HF's).
    """
    N, K = shape
    per_block = 2 + BLOCK * bits // 8
    raw = blocks.reshape(N, K // BLOCK, per_block)
    scales = raw[..., :2].contiguous().view(torch.float16).reshape(N, -1)  # (N, K / 32)
    payload = raw[..., 2:]
    if bits == 8:
        values = payload.contiguous().view(torch.int8).to(torch.int16)
    else:
        values = torch.cat([payload & 0x0F, payload >> 4], dim=-1).to(torch.int16) - BIAS[4]  # (N, K / 32, 32)
    values = values.reshape(N, K)
    if row_order is not None:
        values, scales = values[row_order], scales[row_order]
    return pack(values, scales, bits, BLOCK)
