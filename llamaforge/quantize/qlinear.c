// Weight-only int8 / int4 linear layers for x86 CPUs with AVX-512 VNNI, the decode path of llamaforge.
//
// The arithmetic is llama.cpp's Q8_0 / Q4_0 dot product: activations are quantized on the fly to int8 in
// blocks of 32 (one float scale each), multiplied by the integer weight codes with VPDPBUSD, and each
// 32-wide partial sum is scaled by its activation and weight scales in float (by its activation scale alone where
// the weight has one scale a row, which then multiplies the row's whole sum). Decoding one token reads every
// weight once, so the loop is built to stream weight bytes at memory speed, with as few instructions per
// byte as the arithmetic allows.
//
// Weights (llamaforge/quantize/formats.py writes them) are interleaved in tiles of 16 rows, so that one
// 64-byte vector holds 4 consecutive codes of each of 16 rows: VPDPBUSD against 4 activation bytes broadcast
// to every lane then leaves one row's partial sum per lane, and a 32-weight block of 16 rows needs a single
// float multiply-add for its scales (a row-major layout needs one per row, and is compute-bound at int4).
//   tile t = rows 16t .. 16t + 15 (rows past N are zero codes), block b = weights 32b .. 32b + 31:
//   8 bits: 512 bytes, 8 vectors; vector v, byte 4r + i = code of row r, weight 32b + 4v + i.
//   4 bits: 256 bytes, 4 vectors; vector v, byte 4r + i = code of row r, weight 32b + 4v + i in the low nibble
//           and of weight 32b + 16 + 4v + i in the high nibble.
//   codes: (tiles, blocks, 512 or 256 bytes) uint8, a code being the value + 128 (8 bits) or + 8 (4 bits);
//   scales: (tiles, n_groups, 16) float16, one per `group` weights of a row (the last group may be partial).
// Blocks cover K rounded up to 32; codes past K are zero values, as are activations past K.
//
// Weights of kind KIND_Q4_K keep llama.cpp's Q4_K blocks (formats.py's from_gguf_q4_k): the 4-bit layout's codes q,
// unsigned, and per 32-weight block of a row a scale d * sc and a min dmin * m, w = d * sc * q - dmin * m, from
// 6-bit sc and m bytes under float16 d and dmin for each 256 weights. Their scales are bytes: per tile and
// super-block, d of the 16 rows (float16), dmin, then per block sc of the 16 rows and m (SUPER_BYTES in all).
// KIND_Q5_K is Q4_K with 5-bit codes (0 .. 31): the 4-bit layout's low 4 bits, then a vector whose byte 4r + i holds
// in bit v the top bit of the code in the low nibble of byte 4r + i of vector v (weight 4v + i), in bit 4 + v that of
// its high nibble (weight 16 + 4v + i).
//
// Weights of kind KIND_Q6_K keep llama.cpp's Q6_K blocks (from_gguf_q6_k): 6-bit codes q (value q - 32) with an int8
// scale sc for each 16 weights of a row under a float16 d for each 256, w = d * sc * (q - 32). A block's codes are
// the 4-bit layout's 256 bytes holding each code's low 4 bits, then two vectors holding their top 2 bits: byte 4r + i
// of the first has, in bits 2v and 2v + 1, those of the code in the low nibble of byte 4r + i of vector v (weight
// 4v + i), the second those of the high nibbles (weight 16 + 4v + i). Low nibbles are weights 0 .. 15 of the block,
// high ones 16 .. 31: each half has its own integer sum and scale. Scales per tile and super-block: d of the 16 rows
// (float16), then per block sc of the 16 rows for weights 0 .. 15, then for weights 16 .. 31 (Q6_K_SUPER_BYTES).
//
// Against the k-quants, activations are quantized as llama.cpp quantizes them for these types (its Q8_K): one scale
// x_d for each 256, so that a super-block's integer sums, each times its integer sc, add up in integers, and a row's
// sum takes float arithmetic once a super-block: x_d * d * (sum over blocks of sc * sum(q * x)) (Q6_K: over half
// blocks). What does not depend on the codes (Q4_K's and Q5_K's mins, x_d * dmin * m * sum(x); Q6_K's offset,
// x_d * d * sc * 32 * sum(x)) is an integer sum a super-block too, of 16-bit pairs (VPDPWSSD), taken before the codes'
// (k_quant_offsets). With an activation scale a block, each block cost every activation row a float multiply and two
// multiply-adds on the pipes VPDPBUSD runs on: 1.05-1.10x on a 128-row layer now (docs/benchmarks.md), for a step of
// rounding as large as llama.cpp's own (its quantize_row_q8_K_ref: the same codes).
//
// VPDPBUSD multiplies unsigned by signed bytes. The weight codes are the unsigned side, offset by `bias`
// (128 or 8), so sum(code * x) = sum(w * x) + bias * sum(x); the second term depends on x alone and starts
// each block's sum negated, so the integer sums come out exact.
//
// Built by llamaforge/quantize/kernels.py with -O3 -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mf16c -fopenmp;
// loaded with ctypes. Threads come from the process' OpenMP runtime (the one torch loaded).

#ifndef LLAMAFORGE_EMULATE_AVX512  // kernels.py builds an emulated copy for tests (avx512_emulation.h)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 16    // weight rows interleaved together: one per 32-bit lane
#define BLOCK 32   // weights (and activations) that share one scale
#define Q_M_TILE 8  // activation rows that share each unpacked weight block (4: int4 prefill 2-12% slower)
#define KIND_INT 0   // symmetric codes, float16 scales per group (int8, int4, Q8_0, Q4_0)
#define KIND_Q4_K 1  // llama.cpp's Q4_K: codes with a scale and a min per block under super-block factors
#define KIND_Q6_K 2  // llama.cpp's Q6_K: 6-bit codes with a scale per 16 weights under a super-block factor
#define KIND_Q5_K 3  // llama.cpp's Q5_K: Q4_K's scales and mins with 5-bit codes
#define SUPER_BLOCKS 8    // blocks a k-quant super-block (256 weights)
#define SUPER_BYTES 320   // a tile's Q4_K scale bytes a super-block: 2 x 16 float16, then 8 x 2 x 16 bytes
#define Q6_K_SUPER_BYTES 288  // a tile's Q6_K scale bytes a super-block: 16 float16, then 8 x 2 x 16 int8

// The activations of one call, quantized: everything the inner loop needs that does not depend on weights.
typedef struct {
    int8_t *codes;     // (M, blocks * 32) int8
    int32_t *negbias;  // KIND_INT (M, blocks): -bias * (sum of the block's codes)
    float *scales;     // KIND_INT (M, blocks); k-quants (M, blocks / 8): x_d of each 256
    int32_t *pairs;    // k-quants (M, blocks): sums of codes as int16 pairs, low half first (k_quant_offsets): Q4_K,
                       // Q5_K: of blocks 8j + 2i and 8j + 2i + 1 at 8j + i (i < 4); Q6_K: of block b's halves at b
} QuantizedActivations;

typedef struct {
    int64_t K, blocks, n_groups, group, tile_bytes;
    int64_t tile_scales;  // uint16 units of a tile's scales
    int bits, kind;
} Shape;

static inline __attribute__((always_inline)) __m512 load16_as_float(const void *x, int is_bf16, int64_t index,
                                                                     __mmask16 keep) {
    if (is_bf16) {
        __m256i half = _mm256_maskz_loadu_epi16(keep, (const void *)((const uint16_t *)x + index));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    }
    return _mm512_maskz_loadu_ps(keep, (const float *)x + index);
}

static inline __attribute__((always_inline)) __mmask16 first_lanes(int64_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

// 16 float32 values rounded to bfloat16 (nearest even, as torch's .to(torch.bfloat16)).
static inline __attribute__((always_inline)) __m256i to_bf16(__m512 values) {
    __m512i bits = _mm512_castps_si512(values);
    __m512i rounding = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                        _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(bits, rounding), 16));
}

static inline __attribute__((always_inline)) void store16(void *out, int is_bf16, int64_t index, __m512 values,
                                                         __mmask16 keep) {
    if (is_bf16)
        _mm256_mask_storeu_epi16((uint16_t *)out + index, keep, to_bf16(values));
    else
        _mm512_mask_storeu_ps((float *)out + index, keep, values);
}

// A bfloat16 value (its bits) as float32.
static inline float bf16_value(uint16_t bits) {
    const uint32_t word = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &word, 4);
    return value;
}

// x[index], float32 or bfloat16.
static inline float value_at(const void *x, int is_bf16, int64_t index) {
    return is_bf16 ? bf16_value(((const uint16_t *)x)[index]) : ((const float *)x)[index];
}

// The largest magnitude among x[start .. start + count - 1], float32 or bfloat16.
static inline float largest_magnitude(const void *x, int is_bf16, int64_t start, int64_t count) {
    __m512 top = _mm512_setzero_ps();
    for (int64_t i = 0; i < count; i += 16)
        top = _mm512_max_ps(top, _mm512_abs_ps(load16_as_float(x, is_bf16, start + i, first_lanes(count - i))));
    return _mm512_reduce_max_ps(top);
}

// The first of x[start .. start + count - 1] whose magnitude is `amax` (their largest): the value llama.cpp's
// quantizers keep (and torch's argmax finds); 0 where none is (a NaN among them).
static inline float first_of_magnitude(const void *x, int is_bf16, int64_t start, int64_t count, float amax) {
    for (int64_t i = 0; i < count; i += 16) {
        const __mmask16 keep = first_lanes(count - i);
        const __mmask16 at = _mm512_cmp_ps_mask(_mm512_abs_ps(load16_as_float(x, is_bf16, start + i, keep)),
                                                _mm512_set1_ps(amax), _CMP_EQ_OQ) & keep;
        if (at) return value_at(x, is_bf16, start + i + __builtin_ctz(at));
    }
    return 0.0f;
}

// Two int16 values in one int32, `low` in its low half (VPDPWSSD's pairs).
static inline int32_t int16_pair(int32_t low, int32_t high) {
    return (int32_t)((uint32_t)(uint16_t)low | (uint32_t)high << 16);
}

// Row m of x quantized in blocks of 32 (KIND_INT): scale = absmax / 127, code = round-to-nearest-even(x * (1 / scale)).
// The last block is completed with zeros.
static void quantize_blocks(const void *x, int is_bf16, int64_t m, const Shape *s, int bias,
                            QuantizedActivations *out) {
    for (int64_t b = 0; b < s->blocks; b++) {
        int64_t start = b * BLOCK, index = m * s->K + start;
        __m512 lo = load16_as_float(x, is_bf16, index, first_lanes(s->K - start));
        __m512 hi = load16_as_float(x, is_bf16, index + 16, first_lanes(s->K - start - 16));
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        float scale = amax / 127.0f;
        __m512 inverse = _mm512_set1_ps(scale != 0.0f ? 1.0f / scale : 0.0f);
        // |x / scale| <= 127, so the conversions never saturate.
        __m512i q_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));
        __m512i q_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
        int8_t *codes = out->codes + m * s->blocks * BLOCK + start;
        _mm_storeu_si128((__m128i *)codes, _mm512_cvtepi32_epi8(q_lo));
        _mm_storeu_si128((__m128i *)(codes + 16), _mm512_cvtepi32_epi8(q_hi));
        out->negbias[m * s->blocks + b] = -bias * (_mm512_reduce_add_epi32(q_lo) + _mm512_reduce_add_epi32(q_hi));
        out->scales[m * s->blocks + b] = scale;
    }
}

// Row m of x quantized in blocks of 256 for the k-quants, as llama.cpp's quantize_row_q8_K_ref does (the same codes and
// x_d): the value of largest magnitude (the first of equals) sets iscale = -127 / max, code = round-to-nearest-even(
// iscale * x) (never past 127 in magnitude, so its clamp at 127 is left out) and x_d = 1 / iscale; zero where the
// block is. K is a multiple of 256. Then the code sums k_quant_offsets takes (QuantizedActivations.pairs).
static void quantize_super_blocks(const void *x, int is_bf16, int64_t m, const Shape *s, QuantizedActivations *out) {
    for (int64_t j = 0; j < s->blocks / SUPER_BLOCKS; j++) {
        const int64_t start = m * s->K + j * SUPER_BLOCKS * BLOCK, width = SUPER_BLOCKS * BLOCK;
        const float max = first_of_magnitude(x, is_bf16, start, width, largest_magnitude(x, is_bf16, start, width));
        const float iscale = max != 0.0f ? -127.0f / max : 0.0f;
        int32_t sums[16];  // of each 16 codes
        for (int i = 0; i < 16; i++) {
            const __m512 values = load16_as_float(x, is_bf16, start + 16 * i, (__mmask16)0xFFFF);
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(values, _mm512_set1_ps(iscale)));
            _mm_storeu_si128((__m128i *)(out->codes + (m * s->blocks + j * SUPER_BLOCKS) * BLOCK + 16 * i),
                             _mm512_cvtepi32_epi8(q));
            sums[i] = _mm512_reduce_add_epi32(q);
        }
        out->scales[m * (s->blocks / SUPER_BLOCKS) + j] = max != 0.0f ? 1.0f / iscale : 0.0f;
        int32_t *pairs = out->pairs + m * s->blocks + j * SUPER_BLOCKS;
        for (int i = 0; i < SUPER_BLOCKS; i++)
            pairs[i] = s->kind == KIND_Q6_K ? int16_pair(sums[2 * i], sums[2 * i + 1])
                       : i < SUPER_BLOCKS / 2 ? int16_pair(sums[4 * i] + sums[4 * i + 1],
                                                           sums[4 * i + 2] + sums[4 * i + 3])
                       : 0;
    }
}

// Quantize rows of x (M, K), float32 or bfloat16, into int8 codes for weights of s->kind. Rows split across
// `n_threads` (a prompt's rows: the other core would wait, 1.01-1.10x prefill here); 1 inside a parallel region.
static void quantize_activations(const void *x, int is_bf16, int64_t M, const Shape *s, int bias,
                                 QuantizedActivations *out, int n_threads) {
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (M > 1 && n_threads > 1)
    for (int64_t m = 0; m < M; m++) {
        if (s->kind == KIND_INT)
            quantize_blocks(x, is_bf16, m, s, bias, out);
        else
            quantize_super_blocks(x, is_bf16, m, s, out);
    }
}

// Where a weight has one scale a row (int8's default), a block's partial sums take only their activation scale and
// each row's whole sum its weight scale, once, at the end: one multiply a block fewer, which made a 128-row int8
// layer 1.04-1.10x faster on Zen 4 (docs/benchmarks.md). With groups, each block's weight scale times its
// activation scale multiplies its sums (llama.cpp's order, so a Q8_0 / Q4_0 file's dot products round as there).
// `kind` is s->kind, a constant where the kernels call this, so that each kind's loop has only its own arithmetic.
static inline __attribute__((always_inline)) int one_scale_a_row(const Shape *s, const int kind) {
    return kind == KIND_INT && s->group >= s->K;
}

// Q6_K's top 2 bits of the codes of vector v (bits 2v, 2v + 1 of each byte of `high`) moved to bits 4 and 5 (other
// bits are the caller's to mask off).
static inline __attribute__((always_inline)) __m512i top_bits(__m512i high, const int v) {
    return v == 0 ? _mm512_slli_epi32(high, 4) : v == 1 ? _mm512_slli_epi32(high, 2)
           : v == 2 ? high : _mm512_srli_epi32(high, 2);
}

// The weight scales of block b (KIND_INT) for a tile's 16 rows, where the weight has groups: zeros, never read, where
// it has one scale a row.
static inline __attribute__((always_inline)) __m512 group_scales(const uint16_t *tile_scales, const Shape *s,
                                                                  int64_t b) {
    if (one_scale_a_row(s, KIND_INT)) return _mm512_setzero_ps();
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(tile_scales + b * BLOCK / s->group * TILE)));
}

// A k-quant tile's scale bytes of super-block j (SUPER_BYTES or Q6_K_SUPER_BYTES, described at the top).
static inline __attribute__((always_inline)) const uint8_t *super_block_scales(const uint16_t *tile_scales,
                                                                                const int kind, int64_t j) {
    return (const uint8_t *)tile_scales + j * (kind == KIND_Q6_K ? Q6_K_SUPER_BYTES : SUPER_BYTES);
}

// Within them, block b's 16 sc bytes (b counted from the super-block's first), then its 16 m bytes (Q6_K: the 16 sc of
// the block's last 16 weights).
static inline __attribute__((always_inline)) const uint8_t *block_scale_bytes(const uint8_t *super, const int kind,
                                                                               int64_t b) {
    return super + (kind == KIND_Q6_K ? 2 : 4) * TILE + b * 2 * TILE;
}

// 16 bytes, unsigned or signed, as int32 lanes.
static inline __attribute__((always_inline)) __m512i bytes_as_int32(const uint8_t *bytes, const int is_signed) {
    const __m128i loaded = _mm_loadu_si128((const __m128i *)bytes);
    return is_signed ? _mm512_cvtepi8_epi32(loaded) : _mm512_cvtepu8_epi32(loaded);
}

// The term of each activation row m0 + t's sums that the codes do not change, negated, in acc[t] for the k-quant loop
// to start from: for Q4_K and Q5_K the mins, sum of x_d * dmin * (sum over blocks of m * the block's code sum), for
// Q6_K the codes' offset, sum of x_d * d * 32 * (sum over half blocks of sc * the half's code sum). Each super-block's
// integer sum takes VPDPWSSD over two blocks (halves) at once: their factors, as a lane's int16 pair, times the
// activations' code sums, paired as in QuantizedActivations.pairs.
static inline __attribute__((always_inline)) void k_quant_offsets(
        const uint16_t *tile_scales, const QuantizedActivations *act, int64_t m0, const int count, const int kind,
        const Shape *s, __m512 acc[Q_M_TILE]) {
    const int64_t supers = s->blocks / SUPER_BLOCKS;
    for (int t = 0; t < count; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < supers; j++) {
        const uint8_t *super = super_block_scales(tile_scales, kind, j);
        __m512i sums[Q_M_TILE];
        for (int t = 0; t < count; t++) sums[t] = _mm512_setzero_si512();
        for (int i = 0; i < (kind == KIND_Q6_K ? SUPER_BLOCKS : SUPER_BLOCKS / 2); i++) {
            __m512i factors;
            if (kind == KIND_Q6_K) {
                const uint8_t *sc = block_scale_bytes(super, kind, i);
                factors = _mm512_or_si512(_mm512_and_si512(bytes_as_int32(sc, 1), _mm512_set1_epi32(0xFFFF)),
                                          _mm512_slli_epi32(bytes_as_int32(sc + TILE, 1), 16));
            } else {
                factors = _mm512_or_si512(bytes_as_int32(block_scale_bytes(super, kind, 2 * i) + TILE, 0),
                                          _mm512_slli_epi32(bytes_as_int32(block_scale_bytes(super, kind, 2 * i + 1)
                                                                           + TILE, 0), 16));
            }
            for (int t = 0; t < count; t++) {
                const int32_t code_sums = act->pairs[(m0 + t) * s->blocks + j * SUPER_BLOCKS + i];
                sums[t] = _mm512_dpwssd_epi32(sums[t], factors, _mm512_set1_epi32(code_sums));
            }
        }
        const __m512 factor = kind == KIND_Q6_K
            ? _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)super)), _mm512_set1_ps(32.0f))
            : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(super + 2 * TILE)));
        for (int t = 0; t < count; t++) {
            const __m512 scaled = _mm512_mul_ps(factor, _mm512_set1_ps(act->scales[(m0 + t) * supers + j]));
            acc[t] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(sums[t]), scaled, acc[t]);
        }
    }
}

// The end of super-block j in the k-quant loop: each row's integer sum (of sc * the codes' products) times x_d * d,
// added to acc[t], and the sum set to zero for the next.
static inline __attribute__((always_inline)) void k_quant_super_block_done(
        const uint16_t *tile_scales, const QuantizedActivations *act, int64_t m0, const int count, const int kind,
        const Shape *s, int64_t j, __m512i sums[Q_M_TILE], __m512 acc[Q_M_TILE]) {
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)super_block_scales(tile_scales, kind, j)));
    for (int t = 0; t < count; t++) {
        const float x_d = act->scales[(m0 + t) * (s->blocks / SUPER_BLOCKS) + j];
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[t]), _mm512_mul_ps(d, _mm512_set1_ps(x_d)), acc[t]);
        sums[t] = _mm512_setzero_si512();
    }
}

// A tile's 16 row sums, with their rows' weight scales applied where one_scale_a_row (else as they are).
static inline __attribute__((always_inline)) __m512 row_scaled(__m512 sums, const uint16_t *tile_scales, const Shape *s,
                                                              const int kind) {
    if (!one_scale_a_row(s, kind)) return sums;
    return _mm512_mul_ps(sums, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)tile_scales)));
}

#ifdef LLAMAFORGE_AVX2
// AVX2 has no VPDPBUSD. A tile's 16 rows are two halves of 8 (the low and high 32 bytes of each 64-byte vector), and
// the byte products come from VPMADDUBSW (unsigned times signed bytes, pairs summed into 16 bits, saturating) and
// VPMADDWD (16-bit pairs summed into 32 bits), exact for every width:
//  - 4 bits: codes 0 .. 15 times activations -127 .. 127 make pairs of at most 3,810, so a block's 8 vectors add up
//    in 16 bits (at most 30,480) before one VPMADDWD; the codes' offset goes as on AVX-512 (negbias).
//  - 8 bits: a code minus 128 is the signed value, and VPSIGNB moves each value's sign onto its activation so that
//    the unsigned side is |value| <= 128 (llama.cpp's Q8_0 route): pairs of at most 32,512, each vector its own
//    VPMADDWD, and no offset to remove.
//  - the k-quants: VPMADDWD multiplies the pairs by the block's sc (as a 16-bit pair) where the others take ones, so
//    each sum comes out scaled; 5- and 6-bit codes (pairs up to 7,874 and 16,002) take it vector by vector.

// top_bits for one half of a tile's rows.
static inline __attribute__((always_inline)) __m256i top_bits_256(__m256i high, const int v) {
    return v == 0 ? _mm256_slli_epi32(high, 4) : v == 1 ? _mm256_slli_epi32(high, 2)
           : v == 2 ? high : _mm256_srli_epi32(high, 2);
}

// Half `half` (rows 8h .. 8h + 7) of a block's 8 code vectors: vector v pairs with activation bytes 4v .. 4v + 3.
// 8-bit codes come as signed values, the others unsigned.
static inline __attribute__((always_inline)) void load_half(const uint8_t *block, const int bits, const int half,
                                                            __m256i w[8]) {
    const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
    if (bits == 8) {
        for (int v = 0; v < 8; v++)
            w[v] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(block + 64 * v + 32 * half)),
                                    _mm256_set1_epi8((char)0x80));
    } else if (bits == 5) {
        const __m256i top = _mm256_set1_epi8(0x10);
        const __m256i high = _mm256_loadu_si256((const __m256i *)(block + 256 + 32 * half));
        for (int v = 0; v < 4; v++) {
            const __m256i packed = _mm256_loadu_si256((const __m256i *)(block + 64 * v + 32 * half));
            w[v] = _mm256_or_si256(_mm256_and_si256(packed, low_nibbles),
                                   _mm256_and_si256(_mm256_slli_epi32(high, 4 - v), top));
            w[v + 4] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibbles),
                                       _mm256_and_si256(_mm256_srli_epi32(high, v), top));
        }
    } else if (bits == 6) {
        const __m256i top = _mm256_set1_epi8(0x30);
        const __m256i high[2] = {_mm256_loadu_si256((const __m256i *)(block + 256 + 32 * half)),
                                 _mm256_loadu_si256((const __m256i *)(block + 320 + 32 * half))};
        for (int v = 0; v < 4; v++) {
            const __m256i packed = _mm256_loadu_si256((const __m256i *)(block + 64 * v + 32 * half));
            w[v] = _mm256_or_si256(_mm256_and_si256(packed, low_nibbles),
                                   _mm256_and_si256(top_bits_256(high[0], v), top));
            w[v + 4] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibbles),
                                       _mm256_and_si256(top_bits_256(high[1], v), top));
        }
    } else {
        for (int v = 0; v < 4; v++) {
            const __m256i packed = _mm256_loadu_si256((const __m256i *)(block + 64 * v + 32 * half));
            w[v] = _mm256_and_si256(packed, low_nibbles);
            w[v + 4] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibbles);
        }
    }
}

// Block b (32 weights of a tile's 16 rows, KIND_INT) of the dot products with activation rows m0 .. m0 + count - 1,
// added into acc[t][half] (half h: rows 8h .. 8h + 7).
static inline __attribute__((always_inline)) void block_dot(
        const uint8_t *tile_codes, const uint16_t *tile_scales, const QuantizedActivations *act, int64_t m0,
        const int count, const int bits, const Shape *s, int64_t b, __m256 acc[Q_M_TILE][2]) {
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t *block = tile_codes + b * (s->tile_bytes / s->blocks);
    const int per_row = one_scale_a_row(s, KIND_INT);
    const __m512 w_scales = group_scales(tile_scales, s, b);
    for (int half = 0; half < 2; half++) {
        __m256i w[8];
        load_half(block, bits, half, w);
        for (int t = 0; t < count; t++) {
            const int64_t m = m0 + t;
            const int32_t *x4 = (const int32_t *)(act->codes + (m * s->blocks + b) * BLOCK);
            __m256i sums;
            if (bits == 8) {
                sums = _mm256_setzero_si256();
                for (int v = 0; v < 8; v++)
                    sums = _mm256_add_epi32(sums, _mm256_madd_epi16(_mm256_maddubs_epi16(
                        _mm256_abs_epi8(w[v]), _mm256_sign_epi8(_mm256_set1_epi32(x4[v]), w[v])), ones));
            } else {
                __m256i pairs = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(x4[0]));
                for (int v = 1; v < 8; v++)
                    pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(w[v], _mm256_set1_epi32(x4[v])));
                sums = _mm256_add_epi32(_mm256_madd_epi16(pairs, ones),
                                        _mm256_set1_epi32(act->negbias[m * s->blocks + b]));
            }
            const __m256 x_scale = _mm256_set1_ps(act->scales[m * s->blocks + b]);
            const __m256 scales = per_row ? x_scale : _mm256_mul_ps(w_scales.h[half], x_scale);
            acc[t][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scales, acc[t][half]);
        }
    }
}

// Block b of a k-quant tile dotted with activation rows m0 .. m0 + count - 1: each (half) block's integer sum times its
// sc, added into sums[t] (as k_quant_tile_dot describes).
static inline __attribute__((always_inline)) void k_quant_block(
        const uint8_t *tile_codes, const uint16_t *tile_scales, const QuantizedActivations *act, int64_t m0,
        const int count, const int bits, const int kind, const Shape *s, int64_t b, __m512i sums[Q_M_TILE]) {
    const uint8_t *block = tile_codes + b * (s->tile_bytes / s->blocks);
    const uint8_t *sc = block_scale_bytes(super_block_scales(tile_scales, kind, b / SUPER_BLOCKS), kind,
                                          b % SUPER_BLOCKS);
    const __m512i low_half = _mm512_set1_epi32(0xFFFF);
    const __m512i first = bytes_as_int32(sc, kind == KIND_Q6_K);  // the weights' first 16, Q6_K; else all 32
    const __m512i second = kind == KIND_Q6_K ? bytes_as_int32(sc + TILE, 1) : first;
    const __m512i first_pair = _mm512_or_si512(_mm512_and_si512(first, low_half), _mm512_slli_epi32(first, 16));
    const __m512i second_pair = _mm512_or_si512(_mm512_and_si512(second, low_half), _mm512_slli_epi32(second, 16));
    for (int half = 0; half < 2; half++) {
        __m256i w[8];
        load_half(block, bits, half, w);
        for (int t = 0; t < count; t++) {
            const int32_t *x4 = (const int32_t *)(act->codes + ((m0 + t) * s->blocks + b) * BLOCK);
            __m256i sum;
            if (bits == 4) {
                __m256i pairs = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(x4[0]));
                for (int v = 1; v < 8; v++)
                    pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(w[v], _mm256_set1_epi32(x4[v])));
                sum = _mm256_madd_epi16(pairs, first_pair.h[half]);
            } else {
                sum = _mm256_setzero_si256();
                for (int v = 0; v < 8; v++)
                    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(w[v], _mm256_set1_epi32(x4[v])),
                                                                  v < 4 ? first_pair.h[half] : second_pair.h[half]));
            }
            sums[t].h[half] = _mm256_add_epi32(sums[t].h[half], sum);
        }
    }
}

// One tile's 16 rows (KIND_INT) dotted with activation rows m0 .. m0 + count - 1: out[t] lane r = row r's sum for
// m0 + t.
static inline __attribute__((always_inline)) void tile_dot(
        const uint8_t *tile_codes, const uint16_t *tile_scales, const QuantizedActivations *act, int64_t m0,
        const int count, const int bits, const Shape *s, __m512 out[Q_M_TILE]) {
    __m256 acc[Q_M_TILE][2];
    for (int t = 0; t < count; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < s->blocks; b++) block_dot(tile_codes, tile_scales, act, m0, count, bits, s, b, acc);
    for (int t = 0; t < count; t++) {
        out[t].h[0] = acc[t][0];
        out[t].h[1] = acc[t][1];
        out[t] = row_scaled(out[t], tile_scales, s, KIND_INT);
    }
}

#define TASK_TILES 4  // tiles a task of the joint loop: for a single activation row they stream side by side

// TASK_TILES tiles (codes[i], scales[i], KIND_INT) dotted with activation row m, block by block in turn, each row's
// sum in tile_dot's order: as many streams of weight bytes for a core (one reached ~25 GB/s on Zen 3's two cores).
// Four made decode steps 1.17x faster there (int8 and int4), two 1.05-1.08x; eight are slower (their sums spill).
// Not for the k-quants: their integer sums beside the float ones spill, and a Q4_K_M decode step took 1.64x as long
// as with one tile at a time (Zen 4, docs/benchmarks.md).
static inline __attribute__((always_inline)) void tiles_dot(
        const uint8_t *const codes[TASK_TILES], const uint16_t *const scales[TASK_TILES],
        const QuantizedActivations *act, int64_t m, const int bits, const Shape *s, __m512 out[TASK_TILES]) {
    __m256 acc[TASK_TILES][Q_M_TILE][2];
    for (int i = 0; i < TASK_TILES; i++) acc[i][0][0] = acc[i][0][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < s->blocks; b++)
        for (int i = 0; i < TASK_TILES; i++) block_dot(codes[i], scales[i], act, m, 1, bits, s, b, acc[i]);
    for (int i = 0; i < TASK_TILES; i++) {
        out[i].h[0] = acc[i][0][0];
        out[i].h[1] = acc[i][0][1];
        out[i] = row_scaled(out[i], scales[i], s, KIND_INT);
    }
}
#else
#define TASK_TILES 1  // tiles a task of the joint loop: 2 or 4, as on AVX2, gained nothing on Zen 4 (docs)

// The 8 vectors of a block's weight codes, unsigned: vector v pairs with activation bytes 4v .. 4v + 3.
static inline __attribute__((always_inline)) void load_block(const uint8_t *block, const int bits, __m512i w[8]) {
    if (bits == 8) {
        for (int v = 0; v < 8; v++) w[v] = _mm512_loadu_si512((const void *)(block + 64 * v));
        return;
    }
    if (bits == 5) {  // KIND_Q5_K: each 4-bit code joined by its top bit (bit v, or 4 + v, moved to bit 4)
        const __m512i low_nibbles = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x10);
        const __m512i high = _mm512_loadu_si512((const void *)(block + 256));
        for (int v = 0; v < 4; v++) {
            __m512i packed = _mm512_loadu_si512((const void *)(block + 64 * v));
            w[v] = _mm512_or_si512(_mm512_and_si512(packed, low_nibbles),
                                   _mm512_and_si512(_mm512_slli_epi32(high, 4 - v), top));
            w[v + 4] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles),
                                       _mm512_and_si512(_mm512_srli_epi32(high, v), top));
        }
        return;
    }
    if (bits == 6) {  // KIND_Q6_K: each 4-bit code joined by its top 2 bits
        const __m512i low_nibbles = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
        const __m512i high[2] = {_mm512_loadu_si512((const void *)(block + 256)),
                                 _mm512_loadu_si512((const void *)(block + 320))};
        for (int v = 0; v < 4; v++) {
            __m512i packed = _mm512_loadu_si512((const void *)(block + 64 * v));
            w[v] = _mm512_or_si512(_mm512_and_si512(packed, low_nibbles), _mm512_and_si512(top_bits(high[0], v), top));
            w[v + 4] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles),
                                       _mm512_and_si512(top_bits(high[1], v), top));
        }
        return;
    }
    const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
    for (int v = 0; v < 4; v++) {
        __m512i packed = _mm512_loadu_si512((const void *)(block + 64 * v));
        w[v] = _mm512_and_si512(packed, low_nibbles);
        w[v + 4] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
    }
}

// One tile's 16 rows (KIND_INT) dotted with activation rows m0 .. m0 + count - 1: out[t] lane r = row r's sum for
// m0 + t.
static inline __attribute__((always_inline)) void tile_dot(
        const uint8_t *tile_codes, const uint16_t *tile_scales, const QuantizedActivations *act, int64_t m0,
        const int count, const int bits, const Shape *s, __m512 out[Q_M_TILE]) {
    __m512 acc[Q_M_TILE];
    for (int t = 0; t < count; t++) acc[t] = _mm512_setzero_ps();
    const int64_t block_bytes = s->tile_bytes / s->blocks;
    const int per_row = one_scale_a_row(s, KIND_INT);
    for (int64_t b = 0; b < s->blocks; b++) {
        __m512i w[8];
        load_block(tile_codes + b * block_bytes, bits, w);
        const __m512 w_scales = group_scales(tile_scales, s, b);
        for (int t = 0; t < count; t++) {
            const int64_t m = m0 + t;
            const int32_t *x4 = (const int32_t *)(act->codes + (m * s->blocks + b) * BLOCK);
            // Two chains of multiply-adds, so each waits on half as many predecessors.
            __m512i even = _mm512_set1_epi32(act->negbias[m * s->blocks + b]), odd = _mm512_setzero_si512();
            for (int v = 0; v < 8; v += 2) {
                even = _mm512_dpbusd_epi32(even, w[v], _mm512_set1_epi32(x4[v]));
                odd = _mm512_dpbusd_epi32(odd, w[v + 1], _mm512_set1_epi32(x4[v + 1]));
            }
            const __m512 x_scale = _mm512_set1_ps(act->scales[m * s->blocks + b]);
            const __m512 scales = per_row ? x_scale : _mm512_mul_ps(w_scales, x_scale);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even, odd)), scales, acc[t]);
        }
    }
    for (int t = 0; t < count; t++) out[t] = row_scaled(acc[t], tile_scales, s, KIND_INT);
}

// Block b of a k-quant tile dotted with activation rows m0 .. m0 + count - 1: each (half) block's integer sum times its
// sc, added into sums[t] (as k_quant_tile_dot describes). Two chains of multiply-adds a row: Q6_K's halves (each its
// sc), else the even and odd vectors.
static inline __attribute__((always_inline)) void k_quant_block(
        const uint8_t *tile_codes, const uint16_t *tile_scales, const QuantizedActivations *act, int64_t m0,
        const int count, const int bits, const int kind, const Shape *s, int64_t b, __m512i sums[Q_M_TILE]) {
    __m512i w[8];
    load_block(tile_codes + b * (s->tile_bytes / s->blocks), bits, w);
    const uint8_t *sc = block_scale_bytes(super_block_scales(tile_scales, kind, b / SUPER_BLOCKS), kind,
                                          b % SUPER_BLOCKS);
    const __m512i first = bytes_as_int32(sc, kind == KIND_Q6_K);  // the weights' first 16, Q6_K; else all 32
    for (int t = 0; t < count; t++) {
        const int32_t *x4 = (const int32_t *)(act->codes + ((m0 + t) * s->blocks + b) * BLOCK);
        __m512i one = _mm512_setzero_si512(), other = _mm512_setzero_si512();
        if (kind == KIND_Q6_K) {
            for (int v = 0; v < 4; v++) {
                one = _mm512_dpbusd_epi32(one, w[v], _mm512_set1_epi32(x4[v]));
                other = _mm512_dpbusd_epi32(other, w[v + 4], _mm512_set1_epi32(x4[v + 4]));
            }
            sums[t] = _mm512_add_epi32(sums[t], _mm512_add_epi32(
                _mm512_mullo_epi32(one, first), _mm512_mullo_epi32(other, bytes_as_int32(sc + TILE, 1))));
        } else {
            for (int v = 0; v < 8; v += 2) {
                one = _mm512_dpbusd_epi32(one, w[v], _mm512_set1_epi32(x4[v]));
                other = _mm512_dpbusd_epi32(other, w[v + 1], _mm512_set1_epi32(x4[v + 1]));
            }
            sums[t] = _mm512_add_epi32(sums[t], _mm512_mullo_epi32(_mm512_add_epi32(one, other), first));
        }
    }
}
#endif

// One k-quant tile's 16 rows dotted with activation rows m0 .. m0 + count - 1 (out[t] lane r = row r's sum for m0 + t):
// from k_quant_offsets' terms, then each super-block's integer sum of sc times its blocks' (Q6_K: half blocks')
// integer dot products, times x_d * d. (Within a super-block, sc <= 63 (Q6_K: |sc| <= 128) times at most 8 blocks of
// 32 codes <= 31 (16 <= 63) times 127 stays far inside int32.)
static inline __attribute__((always_inline)) void k_quant_tile_dot(
        const uint8_t *tile_codes, const uint16_t *tile_scales, const QuantizedActivations *act, int64_t m0,
        const int count, const int bits, const int kind, const Shape *s, __m512 out[Q_M_TILE]) {
    __m512i sums[Q_M_TILE];
    k_quant_offsets(tile_scales, act, m0, count, kind, s, out);
    for (int t = 0; t < count; t++) sums[t] = _mm512_setzero_si512();
    for (int64_t b = 0; b < s->blocks; b++) {
        k_quant_block(tile_codes, tile_scales, act, m0, count, bits, kind, s, b, sums);
        if (b % SUPER_BLOCKS == SUPER_BLOCKS - 1)
            k_quant_super_block_done(tile_scales, act, m0, count, kind, s, b / SUPER_BLOCKS, sums, out);
    }
}

static Shape shape_of(int64_t K, int bits, int64_t group, int kind) {
    Shape s;
    s.K = K;
    s.bits = bits;
    s.kind = kind;
    s.blocks = (K + BLOCK - 1) / BLOCK;
    s.group = group;
    s.n_groups = (K + group - 1) / group;
    s.tile_bytes = s.blocks * BLOCK * TILE * bits / 8;
    const int64_t supers = s.blocks / SUPER_BLOCKS;
    s.tile_scales = kind == KIND_Q4_K || kind == KIND_Q5_K ? supers * SUPER_BYTES / 2
                    : kind == KIND_Q6_K ? supers * Q6_K_SUPER_BYTES / 2 : s.n_groups * TILE;
    return s;
}

// Room for the activations of M rows of K values quantized (free with free_activations); 0, or -1 when out of memory.
static int allocate_activations(QuantizedActivations *act, int64_t M, int64_t K) {
    const int64_t blocks = M * ((K + BLOCK - 1) / BLOCK);
    act->codes = (int8_t *)malloc((size_t)(blocks * BLOCK));
    act->negbias = (int32_t *)malloc(sizeof(int32_t) * (size_t)blocks);
    act->scales = (float *)malloc(sizeof(float) * (size_t)blocks);
    act->pairs = (int32_t *)malloc(sizeof(int32_t) * (size_t)blocks);
    return act->codes && act->negbias && act->scales && act->pairs ? 0 : -1;
}

static void free_activations(QuantizedActivations *act) {
    free(act->codes); free(act->negbias); free(act->scales); free(act->pairs);
}

// Which of `count` weights item `joint` of a joint loop over all their items (tiles, rows) belongs to, weight i
// holding items first[i] .. first[i + 1] - 1.
static inline __attribute__((always_inline)) int joint_owner(int64_t joint, int count, const int64_t *first) {
    int i = 0;
    while (i + 1 < count && joint >= first[i + 1]) i++;
    return i;
}

// Where tile `joint` of the joint loop over the tiles of `count` weights (see qlinear_many) lies: weight `owner`'s
// tile `tile`, its codes and scales, and which of its 16 rows exist.
typedef struct {
    int owner;
    int64_t tile;
    const uint8_t *codes;
    const uint16_t *scales;
    __mmask16 keep;
} JointTile;

static inline __attribute__((always_inline)) JointTile joint_tile_at(
        int64_t joint, int count, const int64_t *first_tile, const uint8_t *const *codes, const uint16_t *const *scales,
        const int64_t *Ns, const Shape *s) {
    JointTile t;
    t.owner = joint_owner(joint, count, first_tile);
    t.tile = joint - first_tile[t.owner];
    t.codes = codes[t.owner] + t.tile * s->tile_bytes;
    t.scales = scales[t.owner] + t.tile * s->tile_scales;
    t.keep = first_lanes(Ns[t.owner] - t.tile * TILE);
    return t;
}

// tile_dot (k_quant_tile_dot for a k-quant `kind`) for `rows` (1 .. Q_M_TILE) activation rows from m0, with `rows`
// and `kind` constants in each call, so that the accumulators live in registers and each kind's loop has its own
// arithmetic only.
static inline __attribute__((always_inline)) void tile_rows_of(
        const uint8_t *tile_codes, const uint16_t *tile_scales, const QuantizedActivations *act, int64_t m0,
        const int rows, const int bits, const int kind, const Shape *s, __m512 out[Q_M_TILE]) {
    if (kind == KIND_INT)
        tile_dot(tile_codes, tile_scales, act, m0, rows, bits, s, out);
    else
        k_quant_tile_dot(tile_codes, tile_scales, act, m0, rows, bits, kind, s, out);
}

static inline __attribute__((always_inline)) void tile_rows(
        const uint8_t *tile_codes, const uint16_t *tile_scales, const QuantizedActivations *act, int64_t m0,
        const int rows, const int bits, const int kind, const Shape *s, __m512 out[Q_M_TILE]) {
    switch (rows) {
        case 1: tile_rows_of(tile_codes, tile_scales, act, m0, 1, bits, kind, s, out); break;
        case 2: tile_rows_of(tile_codes, tile_scales, act, m0, 2, bits, kind, s, out); break;
        case 3: tile_rows_of(tile_codes, tile_scales, act, m0, 3, bits, kind, s, out); break;
        case 4: tile_rows_of(tile_codes, tile_scales, act, m0, 4, bits, kind, s, out); break;
        case 5: tile_rows_of(tile_codes, tile_scales, act, m0, 5, bits, kind, s, out); break;
        case 6: tile_rows_of(tile_codes, tile_scales, act, m0, 6, bits, kind, s, out); break;
        case 7: tile_rows_of(tile_codes, tile_scales, act, m0, 7, bits, kind, s, out); break;
        default: tile_rows_of(tile_codes, tile_scales, act, m0, 8, bits, kind, s, out); break;
    }
}

// Tile `joint` of the joint loop: its 16 rows of one y_i.
static inline __attribute__((always_inline)) void joint_tile(
        int64_t joint, int count, const int64_t *first_tile, const uint8_t *const *codes,
        const uint16_t *const *scales, void *const *ys, const int64_t *Ns, int64_t M,
        const QuantizedActivations *act, const Shape *s, int io_bf16) {
    const JointTile at = joint_tile_at(joint, count, first_tile, codes, scales, Ns, s);
    const int64_t N = Ns[at.owner];
    for (int64_t m0 = 0; m0 < M; m0 += Q_M_TILE) {
        __m512 out[Q_M_TILE];
        const int rows = M - m0 < Q_M_TILE ? (int)(M - m0) : Q_M_TILE;
        if (s->kind == KIND_Q4_K)
            tile_rows(at.codes, at.scales, act, m0, rows, s->bits, KIND_Q4_K, s, out);
        else if (s->kind == KIND_Q6_K)
            tile_rows(at.codes, at.scales, act, m0, rows, 6, KIND_Q6_K, s, out);
        else if (s->kind == KIND_Q5_K)
            tile_rows(at.codes, at.scales, act, m0, rows, 5, KIND_Q5_K, s, out);
        else
            tile_rows(at.codes, at.scales, act, m0, rows, s->bits, KIND_INT, s, out);
        for (int t = 0; t < rows; t++) store16(ys[at.owner], io_bf16, (m0 + t) * N + at.tile * TILE, out[t], at.keep);
    }
}

// Tiles first .. first + TASK_TILES - 1 of the joint loop (those below `tiles`, its length).
static inline __attribute__((always_inline)) void joint_task(
        int64_t first, int64_t tiles, int count, const int64_t *first_tile, const uint8_t *const *codes,
        const uint16_t *const *scales, void *const *ys, const int64_t *Ns, int64_t M,
        const QuantizedActivations *act, const Shape *s, int io_bf16) {
#ifdef LLAMAFORGE_AVX2
    if (M == 1 && s->kind == KIND_INT && first + TASK_TILES <= tiles) {
        JointTile at[TASK_TILES];
        const uint8_t *task_codes[TASK_TILES];
        const uint16_t *task_scales[TASK_TILES];
        for (int j = 0; j < TASK_TILES; j++) {
            at[j] = joint_tile_at(first + j, count, first_tile, codes, scales, Ns, s);
            task_codes[j] = at[j].codes;
            task_scales[j] = at[j].scales;
        }
        __m512 out[TASK_TILES];
        tiles_dot(task_codes, task_scales, act, 0, s->bits, s, out);
        for (int j = 0; j < TASK_TILES; j++) store16(ys[at[j].owner], io_bf16, at[j].tile * TILE, out[j], at[j].keep);
        return;
    }
#endif
    for (int64_t joint = first; joint < first + TASK_TILES && joint < tiles; joint++)
        joint_tile(joint, count, first_tile, codes, scales, ys, Ns, M, act, s, io_bf16);
}

// y_i (M, N_i) = x (M, K) @ W_i.T for `count` weights of one scheme (the projections of one input: q, k, v), in
// one parallel loop over all their tiles, with x quantized once. W as described at the top, of `kind` (KIND_INT,
// KIND_Q4_K, KIND_Q5_K: bits 5, KIND_Q6_K: bits 6); x and the y_i are float32, or bfloat16 when io_bf16. `group` is
// the weights per scale along a row (a multiple of 32, or >= K for one scale per row; 32 for KIND_Q4_K and KIND_Q5_K,
// 16 for KIND_Q6_K); count at most 8. Returns 0, or -1 when out of memory (or count is out of range).
int qlinear_many(const void *x, int count, const uint8_t *const *codes, const uint16_t *const *scales,
                 void *const *ys, const int64_t *Ns, int64_t M, int64_t K, int bits, int64_t group, int kind,
                 int io_bf16, int n_threads) {
    const Shape s = shape_of(K, bits, group, kind);
    QuantizedActivations act;
    int64_t first_tile[9];  // weight i has tiles first_tile[i] .. first_tile[i + 1] - 1 of the joint loop
    if (allocate_activations(&act, M, K) != 0 || count < 1 || count > 8) {
        free_activations(&act);
        return -1;
    }
    first_tile[0] = 0;
    for (int i = 0; i < count; i++) first_tile[i + 1] = first_tile[i] + (Ns[i] + TILE - 1) / TILE;
    quantize_activations(x, io_bf16, M, &s, bits == 8 ? 128 : 8, &act, n_threads);
    const int64_t tiles = first_tile[count];
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t first = 0; first < tiles; first += TASK_TILES)
        joint_task(first, tiles, count, first_tile, codes, scales, ys, Ns, M, &act, &s, io_bf16);
    free_activations(&act);
    return 0;
}

static inline uint16_t half_at(const uint8_t *bytes) { return (uint16_t)(bytes[0] | bytes[1] << 8); }

// The top bit(s) that `bits` (5 or 6) add to a row's 16 codes, from the 4 bytes of a top-bit plane that the row's
// codes share (their 4 bytes of the plane's vector, as set1): code k = 4v + i has its bit at bit `shift` + v (5 bits)
// or its 2 bits at bits 2v, 2v + 1 (6 bits) of byte i; they come back at bit 4 (and 5) of byte k.
static inline __attribute__((always_inline)) __m128i top_bits_of_row(__m128i plane, const int bits, const int shift) {
    const __m128i at = _mm_setr_epi8(1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 4, 8, 8, 8, 8);  // bit v of byte k: 1 << k / 4
    if (bits == 5) {
        const __m128i bit = shift ? _mm_slli_epi16(at, 4) : at;  // 16 .. 128 fit each byte: no carry between bytes
        return _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(plane, bit), bit), _mm_set1_epi8(0x10));
    }
    const __m128i low = _mm_setr_epi8(1, 1, 1, 1, 4, 4, 4, 4, 16, 16, 16, 16, 64, 64, 64, 64);  // bit 2v
    const __m128i high = _mm_add_epi8(low, low);  // bit 2v + 1
    return _mm_or_si128(_mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(plane, low), low), _mm_set1_epi8(0x10)),
                        _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(plane, high), high), _mm_set1_epi8(0x20)));
}

// Row r's 32 codes of a block in the layout at the top (any width), unsigned: weights 0 .. 15 in *lo, 16 .. 31 in
// *hi. The row's 4-byte pieces lie 64 bytes apart (dword 16v + r of the block); its top-bit planes' 4 bytes at
// 256 + 4r (5 bits: one plane, the high nibbles' bits from bit 4; 6 bits: 256 + 4r and 320 + 4r).
static inline __attribute__((always_inline)) void row_codes(const uint8_t *block, const int bits, int r, __m128i *lo,
                                                            __m128i *hi) {
    const __m256i pieces = _mm256_add_epi32(_mm256_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112), _mm256_set1_epi32(r));
    if (bits == 8) {
        const __m256i row = _mm256_i32gather_epi32((const int *)block, pieces, 4);
        *lo = _mm256_castsi256_si128(row);
        *hi = _mm256_extracti128_si256(row, 1);
        return;
    }
    const __m128i row = _mm_i32gather_epi32((const int *)block, _mm256_castsi256_si128(pieces), 4);
    *lo = _mm_and_si128(row, _mm_set1_epi8(0x0F));
    *hi = _mm_and_si128(_mm_srli_epi16(row, 4), _mm_set1_epi8(0x0F));
    if (bits == 5) {
        const __m128i plane = _mm_set1_epi32(*(const int32_t *)(block + 256 + 4 * r));
        *lo = _mm_or_si128(*lo, top_bits_of_row(plane, 5, 0));
        *hi = _mm_or_si128(*hi, top_bits_of_row(plane, 5, 4));
    } else if (bits == 6) {
        *lo = _mm_or_si128(*lo, top_bits_of_row(_mm_set1_epi32(*(const int32_t *)(block + 256 + 4 * r)), 6, 0));
        *hi = _mm_or_si128(*hi, top_bits_of_row(_mm_set1_epi32(*(const int32_t *)(block + 320 + 4 * r)), 6, 0));
    }
}

// Row r of a k-quant tile (`kind`), dequantized into out[index .. index + K - 1] as formats.dequantize_weight computes
// it: d * sc * q - dmin * m (Q4_K, Q5_K), d * sc * (q - 32) (Q6_K), every product exact in float32 (only the
// subtraction rounds, so a fused multiply-add would give the same bits).
static void k_quant_row(const uint8_t *tile_codes, const uint16_t *tile_scales, const Shape *s, int kind, int r,
                        void *out, int out_bf16, int64_t index) {
    const int64_t block_bytes = s->tile_bytes / s->blocks;
    for (int64_t b = 0; b < s->blocks; b++) {
        __m128i lo, hi;
        row_codes(tile_codes + b * block_bytes, s->bits, r, &lo, &hi);
        const uint8_t *super = super_block_scales(tile_scales, kind, b / SUPER_BLOCKS);
        const uint8_t *bytes = block_scale_bytes(super, kind, b % SUPER_BLOCKS);
        const float d = _cvtsh_ss(half_at(super + 2 * r));
        __m512 values_lo, values_hi;
        if (kind == KIND_Q6_K) {
            const __m512i offset = _mm512_set1_epi32(32);
            values_lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(lo), offset)),
                                      _mm512_set1_ps(d * (float)(int8_t)bytes[r]));
            values_hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(hi), offset)),
                                      _mm512_set1_ps(d * (float)(int8_t)bytes[TILE + r]));
        } else {
            const __m512 scale = _mm512_set1_ps(d * (float)bytes[r]);
            const __m512 min = _mm512_set1_ps(_cvtsh_ss(half_at(super + 2 * TILE + 2 * r)) * (float)bytes[TILE + r]);
            values_lo = _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), scale), min);
            values_hi = _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), scale), min);
        }
        store16(out, out_bf16, index + b * BLOCK, values_lo, (__mmask16)0xFFFF);
        store16(out, out_bf16, index + b * BLOCK + 16, values_hi, (__mmask16)0xFFFF);
    }
}

// The dense weight (N, K), float32 or bfloat16 (out_bf16), of any kind: for the many-row (prefill) path, exports and
// the embedding of a GGUF file.
void dequantize(const uint8_t *codes, const uint16_t *scales, void *out, int64_t N, int64_t K, int bits,
                int64_t group, int kind, int out_bf16, int n_threads) {
    const Shape s = shape_of(K, bits, group, kind);
    const int64_t tiles = (N + TILE - 1) / TILE;
    const int64_t block_bytes = s.tile_bytes / s.blocks;
    if (kind != KIND_INT) {  // K is a multiple of 256
        #pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int64_t tile = 0; tile < tiles; tile++)
            for (int r = 0; r < TILE && tile * TILE + r < N; r++)
                k_quant_row(codes + tile * s.tile_bytes, scales + tile * s.tile_scales, &s, kind, r, out, out_bf16,
                            (tile * TILE + r) * K);
        return;
    }
    const __m512i bias = _mm512_set1_epi32(bits == 8 ? 128 : 8);
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t tile = 0; tile < tiles; tile++) {
        for (int64_t r = 0; r < TILE && tile * TILE + r < N; r++) {
            const int64_t n = tile * TILE + r;
            for (int64_t b = 0; b < s.blocks; b++) {
                __m128i lo, hi;  // the row's codes for weights 32b .. 32b + 15 and 32b + 16 .. 32b + 31
                row_codes(codes + tile * s.tile_bytes + b * block_bytes, bits, (int)r, &lo, &hi);
                const int64_t g = s.group >= K ? 0 : b * BLOCK / s.group;
                const __m512 scale = _mm512_set1_ps(_cvtsh_ss(scales[(tile * s.n_groups + g) * TILE + r]));
                const int64_t k = b * BLOCK;
                __m512 values_lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(lo), bias)),
                                                 scale);
                __m512 values_hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(hi), bias)),
                                                 scale);
                store16(out, out_bf16, n * K + k, values_lo, first_lanes(K - k));
                store16(out, out_bf16, n * K + k + 16, values_hi, first_lanes(K - k - 16));
            }
        }
    }
}

// ---- Loading: GGUF blocks and stored checkpoints into the layout above ----
// llama.cpp's Q8_0, Q4_0 (KIND_INT, bits 8 / 4, groups of 32), Q4_K, Q5_K and Q6_K blocks, and llamaforge's stored
// layout, as the kernel's codes and scales, nothing rounded: formats.py's from_gguf_blocks, from_gguf_q4_k,
// from_gguf_q6_k and from_stored in one pass over the bytes instead of a dozen torch passes (which the tests hold it
// equal to, and which run without a compiler). The layouts read are described there.
#define GGUF_Q8_0_BYTES 34
#define GGUF_Q4_0_BYTES 18
#define GGUF_Q4_K_BYTES 144
#define GGUF_Q5_K_BYTES 176
#define GGUF_Q6_K_BYTES 210
#define STORED_Q4_K_BYTES 20  // a row's Q4_K / Q5_K scale bytes a super-block in the stored layout: d, dmin, 8 sc, 8 m
#define STORED_Q6_K_BYTES 18  // a row's Q6_K scale bytes a super-block in the stored layout: d, 16 sc

// Row r's Q4_K / Q5_K factors of one super-block into a tile's scales (`out`, SUPER_BYTES): d and dmin (float16
// bytes), then each sub-block's sc and m.
static void put_q4_k_scales(uint8_t *out, int r, const uint8_t *d, const uint8_t *dmin, const uint8_t sc[8],
                            const uint8_t m[8]) {
    memcpy(out + 2 * r, d, 2);
    memcpy(out + 2 * TILE + 2 * r, dmin, 2);
    for (int j = 0; j < 8; j++) {
        out[4 * TILE + j * 2 * TILE + r] = sc[j];
        out[4 * TILE + j * 2 * TILE + TILE + r] = m[j];
    }
}

// Row r's Q6_K factors of one super-block into a tile's scales (`out`, Q6_K_SUPER_BYTES): d (float16 bytes), then
// the sc of each 16 weights.
static void put_q6_k_scales(uint8_t *out, int r, const uint8_t *d, const uint8_t sc[16]) {
    memcpy(out + 2 * r, d, 2);
    for (int j = 0; j < 16; j++) out[2 * TILE + j * TILE + r] = sc[j];
}

// One row of a GGUF tensor (K weights): its codes (value + bias, as the layout stores them) into codes[0 .. K - 1],
// and its scale fields into this row's lane r of the tile's scales (see repack_gguf).
static void gguf_row(const uint8_t *row, int64_t K, int bits, int kind, uint8_t *codes, uint8_t *tile_scales,
                     int r) {
    if (kind == KIND_INT) {
        uint16_t *scales = (uint16_t *)tile_scales;
        for (int64_t b = 0; b < K / BLOCK; b++) {
            const uint8_t *block = row + b * (bits == 8 ? GGUF_Q8_0_BYTES : GGUF_Q4_0_BYTES);
            uint8_t *c = codes + b * BLOCK;
            scales[b * TILE + r] = half_at(block);
            if (bits == 8) {
                for (int i = 0; i < BLOCK; i++) c[i] = block[2 + i] ^ 0x80;  // int8 value + 128
            } else {
                for (int i = 0; i < 16; i++) {
                    c[i] = block[2 + i] & 0x0F;
                    c[16 + i] = block[2 + i] >> 4;
                }
            }
        }
        return;
    }
    for (int64_t s = 0; s < K / 256; s++) {
        uint8_t *c = codes + s * 256;
        if (kind == KIND_Q6_K) {
            const uint8_t *block = row + s * GGUF_Q6_K_BYTES, *ql = block, *qh = block + 128;
            put_q6_k_scales(tile_scales + s * Q6_K_SUPER_BYTES, r, block + 208, block + 192);
            for (int h = 0; h < 2; h++)
                for (int i = 0; i < 64; i++) {
                    c[128 * h + i] = ql[64 * h + i] & 0x0F;
                    c[128 * h + 64 + i] = ql[64 * h + i] >> 4;
                }
            for (int h = 0; h < 2; h++)
                for (int t = 0; t < 4; t++)
                    for (int i = 0; i < 32; i++) c[128 * h + 32 * t + i] |= ((qh[32 * h + i] >> (2 * t)) & 3) << 4;
            continue;
        }
        const uint8_t *block = row + s * (bits == 4 ? GGUF_Q4_K_BYTES : GGUF_Q5_K_BYTES), *packed = block + 4;
        const uint8_t *qs = block + (bits == 4 ? 16 : 48);
        uint8_t sc[8], m[8];
        for (int j = 0; j < 8; j++) {  // 6-bit scale and min of sub-block j (formats.q4_k_scales_and_mins)
            sc[j] = j < 4 ? packed[j] & 0x3F : (packed[j + 4] & 0x0F) | (packed[j - 4] >> 6) << 4;
            m[j] = j < 4 ? packed[j + 4] & 0x3F : (packed[j + 4] >> 4) | (packed[j] >> 6) << 4;
        }
        put_q4_k_scales(tile_scales + s * SUPER_BYTES, r, block, block + 2, sc, m);
        for (int j = 0; j < 4; j++)
            for (int i = 0; i < 32; i++) {
                c[64 * j + i] = qs[32 * j + i] & 0x0F;
                c[64 * j + 32 + i] = qs[32 * j + i] >> 4;
            }
        if (bits == 5)
            for (int j = 0; j < 8; j++)
                for (int i = 0; i < 32; i++) c[32 * j + i] |= ((block[16 + i] >> j) & 1) << 4;
    }
}

// A tile's codes (16 rows of `padded_k` codes each, row r at rows + r * padded_k) in the layout at the top.
static void write_tile(const uint8_t *rows, int64_t padded_k, int bits, uint8_t *tile_codes, int64_t block_bytes) {
    for (int64_t b = 0; b < padded_k / BLOCK; b++) {
        uint8_t *out = tile_codes + b * block_bytes;
        for (int r = 0; r < TILE; r++) {
            const uint8_t *c = rows + r * padded_k + b * BLOCK;
            for (int i = 0; i < 4; i++) {
                if (bits == 8) {
                    for (int v = 0; v < 8; v++) out[64 * v + 4 * r + i] = c[4 * v + i];
                    continue;
                }
                uint8_t top[2] = {0, 0};
                for (int v = 0; v < 4; v++) {
                    const uint8_t low = c[4 * v + i], high = c[16 + 4 * v + i];
                    out[64 * v + 4 * r + i] = (low & 0x0F) | (high & 0x0F) << 4;
                    if (bits == 5) top[0] |= (low >> 4) << v | (high >> 4) << (4 + v);
                    if (bits == 6) {
                        top[0] |= (low >> 4) << (2 * v);
                        top[1] |= (high >> 4) << (2 * v);
                    }
                }
                if (bits >= 5) out[256 + 4 * r + i] = top[0];
                if (bits == 6) out[320 + 4 * r + i] = top[1];
            }
        }
    }
}

// One row of llamaforge's stored layout (formats.py's stored_codes: `code_bytes` of codes, its scales) as gguf_row
// does for GGUF: its K codes into codes[0 .. K - 1], its scale fields into lane r of the tile's scales.
static void stored_row(const uint8_t *row, const uint8_t *row_scales, int64_t K, int64_t code_bytes, int bits,
                       int kind, int64_t n_groups, uint8_t *codes, uint8_t *tile_scales, int r) {
    if (bits == 8) {
        memcpy(codes, row, (size_t)K);
    } else {  // each 128 weights in 64 bytes, weight i in the low nibble of byte i, 64 + i in the high one
        uint8_t run[128];
        for (int64_t j = 0; j * 128 < K; j++) {
            const uint8_t *packed = row + 64 * j;
            for (int i = 0; i < 64; i++) {
                run[i] = packed[i] & 0x0F;
                run[64 + i] = packed[i] >> 4;
            }
            memcpy(codes + 128 * j, run, (size_t)(K - 128 * j < 128 ? K - 128 * j : 128));
        }
        const uint8_t *top = row + code_bytes * 4 / bits;  // then the top bits, 8 / bits - 4 weights a byte
        if (bits == 5)
            for (int64_t k = 0; k < K; k += 8)
                for (int i = 0; i < 8; i++) codes[k + i] |= ((top[k / 8] >> i) & 1) << 4;
        if (bits == 6)
            for (int64_t k = 0; k < K; k += 4)
                for (int i = 0; i < 4; i++) codes[k + i] |= ((top[k / 4] >> (2 * i)) & 3) << 4;
    }
    if (kind == KIND_INT) {
        for (int64_t g = 0; g < n_groups; g++)
            memcpy((uint16_t *)tile_scales + g * TILE + r, row_scales + 2 * g, 2);
        return;
    }
    for (int64_t s = 0; s < K / 256; s++) {
        if (kind == KIND_Q6_K) {
            const uint8_t *super = row_scales + s * STORED_Q6_K_BYTES;
            put_q6_k_scales(tile_scales + s * Q6_K_SUPER_BYTES, r, super, super + 2);
        } else {
            const uint8_t *super = row_scales + s * STORED_Q4_K_BYTES;
            put_q4_k_scales(tile_scales + s * SUPER_BYTES, r, super, super + 2, super + 4, super + 12);
        }
    }
}

// ---- Quantizing: float weights into the layout above (quantize_rows, through repack_tiles below) ----
// formats.py's quantize_weight (llama.cpp's Q8_0 / Q4_0 rules, any group) in one threaded pass, the same codes and
// float16 scales bit for bit (the tests hold the two equal): each product and sum is rounded on its own, as there.
// GCC would fuse x * inverse + 8.5 into one multiply-add, which rounds once; SEPARATE_ROUNDING keeps them apart.
#if defined(__GNUC__) && !defined(__clang__)
#define SEPARATE_ROUNDING __attribute__((optimize("fp-contract=off")))
#else
#define SEPARATE_ROUNDING
#endif

// One group of a row (w[start .. start + count - 1]): its codes (value + bias) into codes[0 .. count - 1]; its scale.
static SEPARATE_ROUNDING float quantize_group(const void *w, int is_bf16, int64_t start, int64_t count, int bits,
                                              uint8_t *codes) {
    const float amax = largest_magnitude(w, is_bf16, start, count);
    const float scale = bits == 8 ? amax / 127.0f : first_of_magnitude(w, is_bf16, start, count, amax) / -8.0f;
    const __m512 inverse = _mm512_set1_ps(scale != 0.0f ? 1.0f / scale : 0.0f);
    const int down = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
    for (int64_t i = 0; i < count; i += 16) {
        const __mmask16 keep = first_lanes(count - i);
        const __m512 scaled = _mm512_mul_ps(load16_as_float(w, is_bf16, start + i, keep), inverse);
        __m512i code;
        if (bits == 8) {  // halves away from zero (llama.cpp's roundf), as formats.py writes it; then the sign
            const __m512 magnitude = _mm512_abs_ps(scaled), whole = _mm512_roundscale_ps(magnitude, down);
            const __m512 half = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_set1_ps(2.0f),
                                                                   _mm512_sub_ps(magnitude, whole)), down);
            const __m512 rounded = _mm512_min_ps(_mm512_add_ps(whole, half), _mm512_set1_ps(127.0f));
            const __m512i sign = _mm512_and_si512(_mm512_castps_si512(scaled), _mm512_set1_epi32((int)0x80000000));
            code = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_castsi512_ps(
                _mm512_or_si512(_mm512_castps_si512(rounded), sign))), _mm512_set1_epi32(128));
        } else {  // llama.cpp: (int8_t)(x + 8.5f), a floor here since x + 8.5 > 0; clamped to 0 .. 15
            const __m512 floored = _mm512_roundscale_ps(_mm512_add_ps(scaled, _mm512_set1_ps(8.5f)), down);
            code = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(floored, _mm512_setzero_ps()),
                                                    _mm512_set1_ps(15.0f)));
        }
        uint8_t bytes[16];
        _mm_storeu_si128((__m128i *)bytes, _mm512_cvtepi32_epi8(code));
        memcpy(codes + i, bytes, (size_t)(count - i < 16 ? count - i : 16));
    }
    return scale;
}

// Where repack_tiles reads its rows: a GGUF tensor's blocks, the stored layout's codes and scales, or float weights
// to quantize.
enum { ROWS_GGUF, ROWS_STORED, ROWS_FLOAT };
typedef struct {
    int format;                      // ROWS_GGUF, ROWS_STORED or ROWS_FLOAT
    const uint8_t *data, *scales;    // the rows; ROWS_STORED's scales
    int64_t row_bytes, scale_bytes;  // of one row
    int is_bf16;                     // ROWS_FLOAT: bfloat16 (else float32) weights
} Rows;

// One row of float weights (ROWS_FLOAT) quantized group by group (quantize_group): its codes into codes[0 .. K - 1],
// its float16 scales into lane r of the tile's.
static void float_row(const void *row, int is_bf16, const Shape *s, uint8_t *codes, uint16_t *tile_scales, int r) {
    const int64_t span = s->group < s->K ? s->group : s->K;
    for (int64_t g = 0; g < s->n_groups; g++) {
        const int64_t start = g * span, count = start + span <= s->K ? span : s->K - start;
        const float scale = quantize_group(row, is_bf16, start, count, s->bits, codes + start);
        tile_scales[g * TILE + r] = _cvtss_sh(scale, _MM_FROUND_TO_NEAREST_INT);
    }
}

// N rows of K weights from `from` (row_order: which of its rows each row of the result is, or NULL for its order)
// into `codes` (tiles, blocks, block bytes) and `scales` ((tiles, n_groups, 16) float16 for KIND_INT, else (tiles,
// K / 256, SUPER_BYTES or Q6_K_SUPER_BYTES) bytes), as formats.py lays them out. Rows past N take the zero value's
// code and zero scales; so do codes past K. Returns 0, or -1 when out of memory.
static int repack_tiles(const Rows *from, int64_t N, int64_t K, const int64_t *row_order, int bits, int64_t group,
                        int kind, uint8_t *codes, uint8_t *scales, int n_threads) {
    const Shape s = shape_of(K, bits, group, kind);
    const int64_t tiles = (N + TILE - 1) / TILE, block_bytes = s.tile_bytes / s.blocks, width = s.blocks * BLOCK;
    const uint8_t bias = bits == 8 ? 128 : (uint8_t)(1 << (bits - 1));  // formats.BIAS
    const int64_t scale_bytes = 2 * s.tile_scales;
    int failed = 0;
    #pragma omp parallel num_threads(n_threads)
    {
        uint8_t *rows = (uint8_t *)malloc((size_t)(TILE * width));
        if (rows == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            if (rows == NULL) continue;
            uint8_t *tile_scales = scales + t * scale_bytes;
            memset(tile_scales, 0, (size_t)scale_bytes);
            memset(rows, bias, (size_t)(TILE * width));
            for (int r = 0; r < TILE && t * TILE + r < N; r++) {
                const int64_t source = row_order != NULL ? row_order[t * TILE + r] : t * TILE + r;
                const uint8_t *row = from->data + source * from->row_bytes;
                if (from->format == ROWS_GGUF)
                    gguf_row(row, K, bits, kind, rows + r * width, tile_scales, r);
                else if (from->format == ROWS_STORED)
                    stored_row(row, from->scales + source * from->scale_bytes, K, from->row_bytes, bits, kind,
                               s.n_groups, rows + r * width, tile_scales, r);
                else
                    float_row(row, from->is_bf16, &s, rows + r * width, (uint16_t *)tile_scales, r);
            }
            write_tile(rows, width, bits, codes + t * s.tile_bytes, block_bytes);
        }
        free(rows);
    }
    return failed ? -1 : 0;
}

// The GGUF tensor `blocks` (N rows of K weights) of llama.cpp's type given by bits and kind (KIND_INT with 8: Q8_0,
// 4: Q4_0) in the layout (repack_tiles). K is a multiple of the type's block.
int repack_gguf(const uint8_t *blocks, int64_t N, int64_t K, const int64_t *row_order, int bits, int kind,
                uint8_t *codes, uint8_t *scales, int n_threads) {
    const int64_t row_bytes = kind == KIND_INT ? K / BLOCK * (bits == 8 ? GGUF_Q8_0_BYTES : GGUF_Q4_0_BYTES)
                              : K / 256 * (kind == KIND_Q6_K ? GGUF_Q6_K_BYTES
                                           : bits == 4 ? GGUF_Q4_K_BYTES : GGUF_Q5_K_BYTES);
    const Rows from = {ROWS_GGUF, blocks, NULL, row_bytes, 0, 0};
    return repack_tiles(&from, N, K, row_order, bits, BLOCK, kind, codes, scales, n_threads);
}

// A weight in llamaforge's stored layout (formats.py's stored_codes: codes (N, code_bytes), scales (N, scale_bytes))
// in the kernel's (repack_tiles), `group` as stored.
int repack_stored(const uint8_t *stored, int64_t code_bytes, const uint8_t *stored_scales, int64_t scale_bytes,
                  int64_t N, int64_t K, int bits, int64_t group, int kind, uint8_t *codes, uint8_t *scales,
                  int n_threads) {
    const Rows from = {ROWS_STORED, stored, stored_scales, code_bytes, scale_bytes, 0};
    return repack_tiles(&from, N, K, NULL, bits, group, kind, codes, scales, n_threads);
}

// The weight w (N, K), float32 or bfloat16, quantized to `bits` (8 or 4) with one scale per `group` weights of a row
// (a multiple of 32, or >= K for one a row; the last group may be partial) into `codes` (tiles, blocks, block bytes)
// and `scales` (tiles, n_groups, 16) float16, as formats.py's quantize_weight and pack lay them out (repack_tiles).
int quantize_rows(const void *w, int is_bf16, int64_t N, int64_t K, int bits, int64_t group, uint8_t *codes,
                  uint16_t *scales, int n_threads) {
    const Rows from = {ROWS_FLOAT, (const uint8_t *)w, NULL, K * (is_bf16 ? 2 : 4), 0, is_bf16};
    return repack_tiles(&from, N, K, NULL, bits, group, KIND_INT, codes, (uint8_t *)scales, n_threads);
}

// The weight w (N, K), float32, as GGUF's Q8_0 / Q4_0 blocks (bits 8 / 4; N x K / 32 blocks of 34 / 18
// bytes, row by row): the bytes llama.cpp's quantizer writes (quantize_group's codes and scales), for `export`.
// K is a multiple of 32.
void quantize_gguf(const float *w, int64_t N, int64_t K, int bits, uint8_t *out, int n_threads) {
    const int64_t blocks = K / BLOCK, block_bytes = bits == 8 ? GGUF_Q8_0_BYTES : GGUF_Q4_0_BYTES;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t b = 0; b < blocks; b++) {
            uint8_t codes[BLOCK], *block = out + (n * blocks + b) * block_bytes;
            const float scale = quantize_group(w, 0, n * K + b * BLOCK, BLOCK, bits, codes);
            const uint16_t half = _cvtss_sh(scale, _MM_FROUND_TO_NEAREST_INT);
            memcpy(block, &half, 2);
            for (int i = 0; i < (bits == 8 ? BLOCK : BLOCK / 2); i++)  // int8 values; Q4_0: i low, 16 + i high
                block[2 + i] = bits == 8 ? codes[i] ^ 0x80 : (uint8_t)(codes[i] | codes[16 + i] << 4);
        }
    }
}
