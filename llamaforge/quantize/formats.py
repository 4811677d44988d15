"""Weight-only int8 and int4 formats (and llama.cpp's Q4_K / Q5_K / Q6_K, kept from GGUF files): quantize a weight,
pack it for the kernel, rebuild it, repack GGUF blocks.

int8 and int4 are symmetric with one float16 scale per `group_size` weights of a row, the rules of llama.cpp's Q8_0 and
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
  64 bytes, weight i in the low nibble of byte i and weight 64 + i in the high nibble; scales (N, n_groups)
  (for "q4_k" below: (N, K / 256 * 20) bytes, each super-block's d and dmin as float16, then its 8 sc, its 8 m;
  "q6_k" stores int4's codes of the low 4 bits, then a byte for each 4 weights' top 2 bits, (N, 3K / 4), and each
  super-block's d and 16 sc, (N, K / 256 * 18) bytes).
  It does not depend on the kernel, which may change its tiling without changing the files.

`group_size` None (or >= the width) means one scale per row, the usual int8 choice.

A third kind, "q4_k", keeps llama.cpp's Q4_K blocks as they are (`from_gguf_q4_k`): 4-bit codes q in 0 .. 15 (the
int4 layout's codes, read as value q - 8) in sub-blocks of 32 weights, each with a 6-bit scale sc and a 6-bit min m
under a super-block of 256 weights' float16 factors d and dmin: w = d * sc * q - dmin * m. Its scales are bytes,
(tiles, K / 256, 320) uint8: for each tile and super-block, d of the tile's 16 rows (float16), then dmin, then for
each of the 8 sub-blocks sc of the 16 rows, then m (qlinear.c reads them). 4.625 bits a weight (the file's 4.5).
"q5_k" is the same with llama.cpp's Q5_K's 5-bit codes (value q - 16): each block's 256 bytes of low 4 bits, then 64
bytes of top bits (qlinear.c describes them). 5.625 bits a weight (the file's 5.5).

A fourth, "q6_k", keeps llama.cpp's Q6_K blocks (`from_gguf_q6_k`): 6-bit codes q (value q - 32) with an int8 scale
sc for each 16 weights of a row under a float16 d for each 256: w = d * sc * (q - 32). Each block's codes are the
int4 layout's 256 bytes of low 4 bits, then 128 bytes of top 2 bits (qlinear.c describes them); its scales
(tiles, K / 256, 288) bytes: d of the tile's 16 rows, then for each block sc of the rows for its first 16 weights,
then for its last 16. 6.5625 bits a weight, as in the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)  # int4's choices; int8 is per row unless a group is asked for
BIAS = {8: 128, 6: 32, 5: 16, 4: 8}  # stored code = value + bias
BLOCK = 32  # weights per block in the kernel's layout; also per Q8_0 / Q4_0 block in GGUF
TILE = 16  # rows interleaved in the kernel's layout
STORED_PAD = 128  # row width multiple of the stored layout
KINDS = ("int", "q4_k", "q5_k", "q6_k")  # symmetric codes, float16 group scales; llama.cpp's k-quants (see above)
WITH_MINS = ("q4_k", "q5_k")  # kinds whose blocks have a min beside their scale
K_QUANT_SCHEMES = {"q4_k": (4, 32), "q5_k": (5, 32), "q6_k": (6, 16)}  # each k-quant's bits and weights per scale
SUPER_BLOCK = 256  # weights of a row under one k-quant super-block's factors (d, and dmin for Q4_K)
Q4_K_BYTES = 144  # a GGUF Q4_K block: d, dmin (float16), 12 bytes of 6-bit scales and mins, 128 bytes of codes
Q5_K_BYTES = 176  # a GGUF Q5_K block: Q4_K's first 16 bytes, 32 bytes of top bits, 128 bytes of low 4 bits
Q6_K_BYTES = 210  # a GGUF Q6_K block: 128 bytes of low 4 bits, 64 of top 2 bits, 16 int8 scales, d (float16)
SUPER_BYTES = 320  # a tile's Q4_K / Q5_K scale bytes a super-block: d, dmin (16 float16 each), 8 x (sc, m), 16 each
STORED_Q4_K_BYTES = 20  # a row's Q4_K / Q5_K scale bytes a super-block in the stored layout: d, dmin, 8 sc, 8 m
Q6_K_SUPER_BYTES = 288  # a tile's Q6_K scale bytes a super-block: d (16 float16), 16 x sc (16 int8 each)
STORED_Q6_K_BYTES = 18  # a row's Q6_K scale bytes a super-block in the stored layout: d, 16 sc


@dataclass
class QuantizedWeight:
    """An (out_features, in_features) weight as integer codes and float16 group scales, in the kernel's layout."""

    codes: torch.Tensor  # (tiles, blocks, 512) uint8 for 8 bits, (tiles, blocks, 256) for 4, (.., 384) for 6 (q6_k)
    scales: torch.Tensor  # (tiles, n_groups, 16) float16; for the k-quants bytes (see above)
    bits: int
    group_size: int  # weights per scale along a row; the whole row for per-row scales
    in_features: int
    out_features: int
    kind: str = "int"  # one of KINDS

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def row_scales(self) -> torch.Tensor:
        """The scales as (out_features, n_groups) float16 (kind "int")."""
        return self.scales.transpose(1, 2).reshape(-1, self.scales.shape[1])[:self.out_features]

    def q4_k_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A "q4_k" / "q5_k" weight's d, dmin (out_features, K / 256) float16 and sc, m (out_features, K / 32) uint8."""
        tiles, supers, _ = self.scales.shape
        factors = self.scales[..., :64].contiguous().view(torch.float16).view(tiles, supers, 2, TILE)
        d, dmin = (factors[:, :, i].transpose(1, 2).reshape(-1, supers)[:self.out_features] for i in (0, 1))
        bytes_ = self.scales[..., 64:].view(tiles, supers, 8, 2, TILE).permute(0, 4, 1, 2, 3)  # [tile, row, s, j, sc/m]
        sc, m = (bytes_[..., i].reshape(tiles * TILE, -1)[:self.out_features] for i in (0, 1))
        return d, dmin, sc, m

    def q6_k_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A "q6_k" weight's d (out_features, K / 256) float16 and sc (out_features, K / 16) int8."""
        tiles, supers, _ = self.scales.shape
        d = self.scales[..., :2 * TILE].contiguous().view(torch.float16).transpose(1, 2).reshape(-1, supers)
        sc = self.scales[..., 2 * TILE:].view(tiles, supers, 16, TILE).permute(0, 3, 1, 2).reshape(tiles * TILE, -1)
        return d[:self.out_features], sc[:self.out_features].contiguous().view(torch.int8)

    @property
    def sub_block(self) -> int:
        """Weights of a row that share one scale inside the kernel's 32-weight blocks: a k-quant's group, else 32."""
        return BLOCK if self.kind == "int" else self.group_size

    def block_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 scale and min of each `sub_block` weights (out_features, K / sub_block): d * sc and dmin * m
        for "q4_k" and "q5_k", d * sc and zeros for "q6_k" (exact in float32), each group's scale and zeros for
        "int"."""
        blocks = -(-self.in_features // BLOCK)
        if self.kind == "q6_k":
            d, sc = self.q6_k_factors()
            scales = d.float().repeat_interleave(SUPER_BLOCK // 16, dim=1) * sc.float()
            return scales, torch.zeros_like(scales)
        if self.kind in WITH_MINS:
            d, dmin, sc, m = self.q4_k_factors()
            per_block = SUPER_BLOCK // BLOCK
            return (d.float().repeat_interleave(per_block, dim=1) * sc.float(),
                    dmin.float().repeat_interleave(per_block, dim=1) * m.float())
        scales = self.row_scales().float()[:, torch.arange(blocks) * BLOCK // self.group_size]
        return scales, torch.zeros_like(scales)


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


def group_width(bits: int, group_size: int | None, in_features: int) -> int:
    """The weights a scale covers along a row of `in_features` for `group_size` (None: the whole row for int8, the
    smallest group for int4), at most the row."""
    if bits == 4 and group_size is None:
        group_size = GROUP_SIZES[0]
    return min(group_size or in_features, in_features)


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None = None) -> QuantizedWeight:
    """Quantize a 2-D float weight (N, K) to `bits` with one scale per `group_size` weights (None: per row)."""
    check_scheme(bits, group_size)
    N, K = weight.shape
    group = group_width(bits, group_size, K)
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
        codes = (whole + (2 * (magnitude - whole)).floor()).copysign_(scaled).clamp_(-127, 127) + BIAS[8]
    else:  # llama.cpp: (int8_t)(x + 8.5f), a truncation that is a floor here since x + 8.5 > 0
        codes = (scaled + 8.5).floor().clamp_(0, 15)
    return pack(codes.view(N, -1)[:, :K].to(torch.uint8), scale.to(torch.float16), bits, group)


def pack(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Codes (N, K) uint8 (value + BIAS[bits]) and float16 scales (N, n_groups) in the kernel's layout (qlinear.c)."""
    N, K = codes.shape
    return QuantizedWeight(pack_codes(codes, bits), tiled_rows(scales).transpose(1, 2).contiguous(), bits,
                           group_size, K, N)


def tiled_rows(t: torch.Tensor) -> torch.Tensor:
    """Per-row values (N, ...) as (tiles, 16, ...), the rows past N zero."""
    tiles = -(-t.shape[0] // TILE)
    out = torch.zeros(tiles * TILE, *t.shape[1:], dtype=t.dtype, device=t.device)
    out[:t.shape[0]] = t
    return out.view(tiles, TILE, *t.shape[1:])


def bit_offsets(width: int, like: torch.Tensor) -> torch.Tensor:
    """0, width, 2 * width, ... below 8, uint8 on `like`'s device: where fields of `width` bits sit in a byte."""
    return torch.arange(0, 8, width, dtype=torch.uint8, device=like.device)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (N, K) uint8 (value + BIAS[bits]) in the kernel's layout (tiles, blocks, 512, 384 or 256) uint8 (see
    qlinear.c). Loading a 7B GGUF repacks every weight through here: each step is one pass over uint8 codes."""
    N, K = codes.shape
    tiles, blocks = -(-N // TILE), -(-K // BLOCK)
    if N % TILE or K % BLOCK:  # rows past N and codes past K are zero values
        padded = torch.full((tiles * TILE, blocks * BLOCK), BIAS[bits], dtype=torch.uint8, device=codes.device)
        padded[:N, :K] = codes
        codes = padded
    if bits in (5, 6):  # the low 4 bits as int4's layout, then the top bits of each of its bytes' two codes
        low = pack_codes(codes & 0x0F, 4)
        top = (codes >> 4).view(tiles, TILE, blocks, 2, 4, 4)  # [tile, row, block, half, vector, byte]
        if bits == 6:  # [tile, block, half, row, byte, vector]: vector v's in bits 2v, 2v + 1 of a byte a half
            top = top.permute(0, 2, 3, 1, 5, 4) << bit_offsets(2, top)
        else:  # [tile, block, row, byte, half, vector]: bit v (half 0) or 4 + v (half 1) of one byte
            top = top.permute(0, 2, 1, 5, 3, 4).reshape(tiles, blocks, TILE, 4, 8) << bit_offsets(1, top)
        return torch.cat([low, top.sum(-1, dtype=torch.uint8).reshape(tiles, blocks, -1)], dim=-1).contiguous()
    if bits == 8:  # [tile, row, block, vector, byte] -> [tile, block, vector, row, byte]
        codes = codes.view(tiles, TILE, blocks, 8, 4).permute(0, 2, 3, 1, 4)
    else:  # [tile, row, block, half, vector, byte] -> [tile, block, half, vector, row, byte]; halves to nibbles
        halves = codes.view(tiles, TILE, blocks, 2, 4, 4).permute(0, 2, 3, 4, 1, 5)
        codes = halves[:, :, 0] | halves[:, :, 1] << 4
    return codes.reshape(tiles, blocks, -1).contiguous()


def unpack_codes(q: QuantizedWeight) -> torch.Tensor:
    """The signed values (N, K) as int16: the codes `pack` took, less BIAS."""
    codes = _unpack_rows(q.codes, q.bits)[:q.out_features, :q.in_features]
    return codes.to(torch.int16) - BIAS[q.bits]


def _unpack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The kernel's codes (tiles, blocks, bytes) as row-major unsigned codes (tiles * 16, blocks * 32) uint8."""
    tiles, blocks, _ = codes.shape
    if bits == 8:
        rows = codes.view(tiles, blocks, 8, TILE, 4).permute(0, 3, 1, 2, 4)  # [tile, row, block, vector, byte]
    elif bits == 6:
        top = codes[..., 256:].reshape(tiles, blocks, 2, TILE, 4, 1) >> bit_offsets(2, codes)
        top = (top & 0x03).permute(0, 3, 1, 2, 5, 4)  # [tile, row, block, half, vector, byte]
        return _unpack_rows(codes[..., :256], 4) | top.reshape(tiles * TILE, blocks * BLOCK) << 4
    elif bits == 5:
        top = codes[..., 256:].reshape(tiles, blocks, TILE, 4, 1) >> bit_offsets(1, codes)
        # [tile, block, row, byte, half, vector] -> [tile, row, block, half, vector, byte]
        top = (top & 0x01).view(tiles, blocks, TILE, 4, 2, 4).permute(0, 2, 1, 4, 5, 3)
        return _unpack_rows(codes[..., :256], 4) | top.reshape(tiles * TILE, blocks * BLOCK) << 4
    else:
        packed = codes.reshape(tiles, blocks, 1, 4, TILE, 4)
        halves = torch.cat([packed & 0x0F, packed >> 4], dim=2)  # [tile, block, half, vector, row, byte]
        rows = halves.permute(0, 4, 1, 2, 3, 5)
    return rows.reshape(tiles * TILE, blocks * BLOCK)


def dequantize_weight(q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight (N, K) the codes stand for, in `dtype` (computed in float32, then cast)."""
    values = unpack_codes(q).float()
    if q.kind in WITH_MINS:  # d * sc * q is exact in float32, so only the subtraction rounds, as in llama.cpp
        scales, mins = (t.repeat_interleave(BLOCK, dim=1) for t in q.block_scales())
        return ((values + BIAS[q.bits]) * scales - mins).to(dtype)
    if q.kind == "q6_k":
        return (values * q.block_scales()[0].repeat_interleave(q.sub_block, dim=1)).to(dtype)
    scales = q.row_scales().float().repeat_interleave(q.group_size, dim=1)[:, :q.in_features]
    return (values * scales).to(dtype)


def stored_codes(q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes and scales in the stored (checkpoint) layout: (N, Kp) or (N, Kp / 2) uint8, (N, n_groups) float16
    (kind "q4_k": scales (N, K / 256 * 20) uint8, each super-block's d, dmin (float16), its 8 sc, its 8 m; "q5_k"
    the same scales, codes (N, 5K / 8), int4's then a bit a weight; "q6_k": codes (N, 3K / 4), int4's then 2 bits a
    weight, scales (N, K / 256 * 18) uint8, each super-block's d (float16) and 16 int8 sc)."""
    N, K = q.out_features, q.in_features
    padded = torch.full((N, stored_width(K)), BIAS[q.bits], dtype=torch.uint8, device=q.codes.device)
    padded[:, :K] = _unpack_rows(q.codes, q.bits)[:N, :K]
    if q.bits in (5, 6):  # int4's runs of the low 4 bits, then the top bits packed 8 / 4 weights a byte
        width = q.bits - 4
        top = (padded >> 4).view(N, -1, 8 // width) << bit_offsets(width, padded)
        padded = torch.cat([stored_nibbles(padded & 0x0F), top.sum(-1, dtype=torch.uint8)], dim=1)
    if q.bits == 4:
        padded = stored_nibbles(padded)
    if q.kind in WITH_MINS:
        d, dmin, sc, m = q.q4_k_factors()
        supers = d.shape[1]
        factors = torch.stack([d, dmin], dim=-1).contiguous().view(torch.uint8)  # (N, supers, 4)
        return padded, torch.cat([factors, sc.reshape(N, supers, 8), m.reshape(N, supers, 8)], dim=-1).reshape(N, -1)
    if q.kind == "q6_k":
        d, sc = q.q6_k_factors()
        supers = d.shape[1]
        factors = d.flatten().view(torch.uint8).view(N, supers, 2)
        return padded, torch.cat([factors, sc.view(torch.uint8).view(N, supers, 16)], dim=-1).reshape(N, -1)
    return padded, q.row_scales().contiguous()


def stored_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes below 16 (N, Kp) two a byte (N, Kp / 2): each run of 128 weights in 64 bytes, weight i in the low nibble
    of byte i and weight 64 + i in the high one."""
    runs = codes.view(codes.shape[0], -1, 2, 64)  # (N, Kp / 128, low / high half, 64)
    return (runs[:, :, 0] | runs[:, :, 1] << 4).reshape(codes.shape[0], -1)


def nibble_runs(packed: torch.Tensor, run: int) -> torch.Tensor:
    """4-bit codes (..., 2n) from bytes (..., n) whose every `run` bytes hold codes i in their low nibbles and
    run + i in their high ones (i < run): the layout of `stored_nibbles` (run 64), of GGUF's Q4_0 (16), Q4_K's (32)
    and Q6_K's low bits (64)."""
    runs = packed.reshape(*packed.shape[:-1], -1, 1, run)
    return torch.cat([runs & 0x0F, runs >> 4], dim=-2).reshape(*packed.shape[:-1], -1)


def float16_at(raw: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 stored in bytes offset, offset + 1 of the last dimension of `raw` (..., bytes): (...)."""
    return raw[..., offset:offset + 2].contiguous().view(torch.float16)[..., 0]


def from_stored(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, in_features: int,
                kind: str = "int") -> QuantizedWeight:
    """A weight from the stored layout (`stored_codes`), repacked for the kernel."""
    N = codes.shape[0]
    if bits == 4:
        codes = nibble_runs(codes, 64)
    elif bits in (5, 6):
        width = bits - 4
        half = codes.shape[1] * 4 // bits  # Kp / 2 bytes of low bits, then Kp * width / 8 of top bits
        top = (codes[:, half:].reshape(N, -1, 1) >> bit_offsets(width, codes)) & (2**width - 1)
        codes = nibble_runs(codes[:, :half], 64) | top.reshape(N, -1) << 4
    codes = codes[:, :in_features]
    if kind in WITH_MINS:
        supers = scales.reshape(N, -1, STORED_Q4_K_BYTES)
        d, dmin = float16_at(supers, 0), float16_at(supers, 2)
        return pack_q4_k(codes, d, dmin, supers[..., 4:12].reshape(N, -1), supers[..., 12:].reshape(N, -1), bits)
    if kind == "q6_k":
        supers = scales.reshape(N, -1, STORED_Q6_K_BYTES)
        sc = supers[..., 2:].contiguous().view(torch.int8).reshape(N, -1)
        return pack_q6_k(codes, float16_at(supers, 0), sc)
    return pack(codes, scales, bits, group_size)


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
    scales = float16_at(raw, 0)  # (N, K / 32)
    payload = raw[..., 2:]
    # The codes are the values + BIAS: an int8 value's byte with its sign bit flipped; Q4_0's nibbles as they are.
    codes = (payload ^ 0x80 if bits == 8 else nibble_runs(payload, 16)).reshape(N, K)
    if row_order is not None:
        codes, scales = codes[row_order], scales[row_order]
    return pack(codes, scales, bits, BLOCK)


def q4_k_scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 sub-blocks' 6-bit scales and mins (..., 8) uint8 from Q4_K's 12 packed bytes (..., 12): bytes 0-3 and
    4-7 hold sub-blocks 0-3's scales and mins in their low 6 bits, bytes 8-11 the low 4 bits of sub-blocks 4-7's
    (scale low, min high nibble), whose top 2 bits are the top 2 bits of bytes 0-3 (scales) and 4-7 (mins)."""
    low, mid, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = torch.cat([low & 0x3F, (high & 0x0F) | (low >> 6) << 4], dim=-1)
    mins = torch.cat([mid & 0x3F, high >> 4 | (mid >> 6) << 4], dim=-1)
    return scales, mins


def from_gguf_q4_k(blocks: torch.Tensor, shape: tuple[int, int], row_order: torch.Tensor | None = None,
                   bits: int = 4) -> QuantizedWeight:
    """A GGUF Q4_K (bits 5: Q5_K) tensor's raw bytes as a "q4_k" ("q5_k") QuantizedWeight, nothing rounded (see the
    module docstring).

    A block covers 256 weights of a row: d, dmin (float16), 12 bytes of packed 6-bit scales and mins
    (`q4_k_scales_and_mins`), for Q5_K 32 bytes whose byte i holds in bit j the top bit of sub-block j's code i, then
    128 bytes whose run j of 32 holds sub-block 2j's (low 4 bits of) codes in its low nibbles and sub-block 2j + 1's
    in its high ones. `row_order` (N,) takes the rows in that order.
    """
    N, K = shape
    raw = blocks.reshape(N, K // SUPER_BLOCK, Q4_K_BYTES if bits == 4 else Q5_K_BYTES)
    if row_order is not None:
        raw = raw[row_order]
    d, dmin = float16_at(raw, 0), float16_at(raw, 2)  # (N, supers)
    sc, m = q4_k_scales_and_mins(raw[..., 4:16])  # (N, supers, 8) each
    codes = nibble_runs(raw[..., -128:], 32).reshape(N, -1, 8, 32)  # (N, supers, sub-block, 32)
    if bits == 5:
        codes |= ((raw[..., 16:48].reshape(N, -1, 1, 32) >> bit_offsets(1, raw)[:, None]) & 1) << 4
    return pack_q4_k(codes.reshape(N, K), d, dmin, sc.reshape(N, -1), m.reshape(N, -1), bits)


def from_gguf_q5_k(blocks: torch.Tensor, shape: tuple[int, int],
                   row_order: torch.Tensor | None = None) -> QuantizedWeight:
    """A GGUF Q5_K tensor's raw bytes as a "q5_k" QuantizedWeight (`from_gguf_q4_k`)."""
    return from_gguf_q4_k(blocks, shape, row_order, bits=5)


def pack_q4_k(codes: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor,
              m: torch.Tensor, bits: int = 4) -> QuantizedWeight:
    """A "q4_k" weight (bits 5: "q5_k") in the kernel's layout from its codes q (N, K) uint8, d and dmin
    (N, K / 256) float16 and sc and m (N, K / 32) uint8."""
    N, K = codes.shape
    tiles, supers = -(-N // TILE), K // SUPER_BLOCK
    factors = torch.stack([tiled_rows(d), tiled_rows(dmin)], dim=2)  # (tiles, 16, d / dmin, supers)
    factors = factors.permute(0, 3, 2, 1).contiguous().view(torch.uint8).reshape(tiles, supers, 64)
    pairs = torch.stack([tiled_rows(sc), tiled_rows(m)], dim=-1).view(tiles, TILE, supers, 8, 2)  # [tile, row, s, j, .]
    pairs = pairs.permute(0, 2, 3, 4, 1).reshape(tiles, supers, 256)
    kind = "q4_k" if bits == 4 else "q5_k"
    return QuantizedWeight(pack_codes(codes, bits), torch.cat([factors, pairs], dim=-1).contiguous(),
                           *K_QUANT_SCHEMES[kind], K, N, kind=kind)


def from_gguf_q6_k(blocks: torch.Tensor, shape: tuple[int, int],
                   row_order: torch.Tensor | None = None) -> QuantizedWeight:
    """A GGUF Q6_K tensor's raw bytes as a "q6_k" QuantizedWeight, nothing rounded (see the module docstring).

    A block (210 bytes) covers 256 weights of a row: in each half of 128 weights, 64 bytes hold weight i's low 4
    bits in the low nibble of byte i and weight 64 + i's in the high one, then (after both halves) 32 bytes a half
    hold weight 32t + i's top 2 bits in bits 2t, 2t + 1 of byte i; then 16 int8 scales (one per 16 weights), d.
    """
    N, K = shape
    raw = blocks.reshape(N, K // SUPER_BLOCK, Q6_K_BYTES)
    if row_order is not None:
        raw = raw[row_order]
    low = nibble_runs(raw[..., :128], 64)  # (N, supers, 256) in weight order
    top = (raw[..., 128:192].reshape(N, -1, 2, 1, 32) >> bit_offsets(2, raw)[:, None]) & 3  # (N, supers, half, t, 32)
    codes = low.reshape(N, K) | top.reshape(N, K) << 4
    sc = raw[..., 192:208].contiguous().view(torch.int8).reshape(N, -1)
    return pack_q6_k(codes, float16_at(raw, 208), sc)


def pack_q6_k(codes: torch.Tensor, d: torch.Tensor, sc: torch.Tensor) -> QuantizedWeight:
    """A "q6_k" weight in the kernel's layout from its codes q (N, K) uint8 (value q - 32), d (N, K / 256) float16
    and sc (N, K / 16) int8."""
    N, K = codes.shape
    tiles, supers = -(-N // TILE), K // SUPER_BLOCK
    factors = tiled_rows(d).transpose(1, 2).contiguous().view(torch.uint8)  # (tiles, supers, 32)
    scales = tiled_rows(sc.view(torch.uint8)).view(tiles, TILE, supers, 16).permute(0, 2, 3, 1)
    scales = scales.reshape(tiles, supers, 256)
    return QuantizedWeight(pack_codes(codes, 6), torch.cat([factors, scales], dim=-1).contiguous(),
                           *K_QUANT_SCHEMES["q6_k"], K, N, kind="q6_k")


# llama.cpp's block types a GGUF tensor keeps as stored: its bits and kind.
GGUF_SCHEMES = {"Q8_0": (8, "int"), "Q4_0": (4, "int"), "Q4_K": (4, "q4_k"), "Q5_K": (5, "q5_k"), "Q6_K": (6, "q6_k")}


def from_gguf(blocks: torch.Tensor, type_name: str, shape: tuple[int, int],
              row_order: torch.Tensor | None = None) -> QuantizedWeight:
    """A GGUF tensor's raw bytes of one of GGUF_SCHEMES' types as a QuantizedWeight, nothing rounded (in torch;
    kernels.repack_gguf does it in one compiled pass)."""
    bits, kind = GGUF_SCHEMES[type_name]
    if kind == "int":
        return from_gguf_blocks(blocks, bits, shape, row_order)
    if kind == "q6_k":
        return from_gguf_q6_k(blocks, shape, row_order)
    return from_gguf_q4_k(blocks, shape, row_order, bits)
