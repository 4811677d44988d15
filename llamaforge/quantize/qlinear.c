// Weight-only int8 / int4 linear layers for x86 CPUs with AVX-512 VNNI, the batch-1 decode path of llamaforge.
//
// The arithmetic is llama.cpp's Q8_0 / Q4_0 dot product: activations are quantized on the fly to int8 in
// blocks of 32 (one float scale each), multiplied by the integer weight codes with VPDPBUSD (64 int8
// multiply-adds per instruction), and each 32-wide partial sum is scaled by its activation and weight
// scales in float. Decoding one token reads every weight once, so the loop is built to stream weight bytes
// at memory speed; everything that depends on the activations alone is computed once per call.
//
// Weights (see llamaforge/quantize/formats.py, which writes them):
//   8 bits: codes (N, Kp) uint8, the signed value + 128.
//   4 bits: codes (N, Kp / 2) uint8; each 64-byte chunk holds 128 consecutive weights, weight i of the chunk
//           in the low nibble of byte i and weight 64 + i in the high nibble; a code is the value + 8.
//   scales (N, n_groups) float16, one per `group` weights of a row (the last group may be partial).
// Kp is K rounded up to a multiple of 128; codes past K are zero values and activations past K are zero.
//
// VPDPBUSD multiplies unsigned by signed bytes. The weight codes are the unsigned side, offset by `bias`
// (128 or 8), so sum(code * x) = sum(w * x) + bias * sum(x); the second term depends on x alone and starts
// each accumulation negated, so the integer sums come out exact.
//
// Built by llamaforge/quantize/kernels.py with -O3 -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mf16c -fopenmp;
// loaded with ctypes. Threads come from the process' OpenMP runtime (the one torch loaded).

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32   // activation block: 32 values share one scale
#define CHUNK 64   // weights per VPDPBUSD: 64 bytes of codes
#define M_TILE 4   // activation rows that share each loaded weight chunk

// The activations of one call, quantized: everything the inner loop needs that does not depend on weights.
typedef struct {
    int8_t *codes;     // (M, Kp) int8
    __m512i *negbias;  // (M, Kp / 64): per 32-bit lane, -bias * (sum of the lane's 4 codes)
    __m512 *scales;    // (M, Kp / 64): per lane, the scale of the 32-block the lane is in
} QuantizedActivations;

static inline __m512 load16_as_float(const void *x, int is_bf16, int64_t index) {
    if (is_bf16) {
        __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + index));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    }
    return _mm512_loadu_ps((const float *)x + index);
}

static inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    bits += 0x7FFF + ((bits >> 16) & 1);  // round to nearest even, as torch's .to(torch.bfloat16)
    return (uint16_t)(bits >> 16);
}

// Quantize rows of x (M, K), float32 or bfloat16, into int8 blocks of 32: scale = absmax / 127,
// code = round-to-nearest-even(x * (1 / scale)). Blocks past K are zero.
static void quantize_activations(const void *x, int is_bf16, int64_t M, int64_t K, int64_t Kp, int bias,
                                 QuantizedActivations *out) {
    const int64_t blocks = Kp / BLOCK;
    float *block_scales = (float *)malloc(sizeof(float) * (size_t)blocks);
    const __m512i bias_bytes = _mm512_set1_epi8((char)bias);
    for (int64_t m = 0; m < M; m++) {
        int8_t *codes = out->codes + m * Kp;
        for (int64_t b = 0; b < blocks; b++) {
            int64_t start = b * BLOCK;
            if (start >= K) {
                memset(codes + start, 0, BLOCK);
                block_scales[b] = 0.0f;
                continue;
            }
            float values[BLOCK];
            int64_t n = K - start < BLOCK ? K - start : BLOCK;
            if (n == BLOCK) {
                _mm512_storeu_ps(values, load16_as_float(x, is_bf16, m * K + start));
                _mm512_storeu_ps(values + 16, load16_as_float(x, is_bf16, m * K + start + 16));
            } else {
                for (int64_t i = 0; i < BLOCK; i++) {
                    if (i >= n) { values[i] = 0.0f; continue; }
                    if (is_bf16) {
                        uint32_t bits = (uint32_t)((const uint16_t *)x)[m * K + start + i] << 16;
                        memcpy(&values[i], &bits, 4);
                    } else {
                        values[i] = ((const float *)x)[m * K + start + i];
                    }
                }
            }
            __m512 lo = _mm512_loadu_ps(values), hi = _mm512_loadu_ps(values + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            float scale = amax / 127.0f;
            float inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
            __m512 inv = _mm512_set1_ps(inverse);
            __m128i q_lo = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)));
            __m128i q_hi = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inv)));
            _mm_storeu_si128((__m128i *)(codes + start), q_lo);
            _mm_storeu_si128((__m128i *)(codes + start + 16), q_hi);
            block_scales[b] = scale;
        }
        for (int64_t c = 0; c < Kp / CHUNK; c++) {
            __m512i chunk = _mm512_loadu_si512((const void *)(codes + c * CHUNK));
            __m512i lane_sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias_bytes, chunk);
            out->negbias[m * (Kp / CHUNK) + c] = _mm512_sub_epi32(_mm512_setzero_si512(), lane_sums);
            // Lanes 0-7 hold the first 32-block of the chunk, lanes 8-15 the second.
            out->scales[m * (Kp / CHUNK) + c] = _mm512_mask_blend_ps(
                0xFF00, _mm512_set1_ps(block_scales[2 * c]), _mm512_set1_ps(block_scales[2 * c + 1]));
        }
    }
    free(block_scales);
}

// Weight scales are read 16 at a time, for a run of 512 weights (8 chunks), and spread over each chunk's lanes
// by one permutation: lane l of chunk j gets the scale of block 2j + l / 8 of the run.
#define RUN 512

// The permutation indices of the 8 chunks of a run, for `group` weights per scale (>= K: one per row).
static void run_permutations(int64_t group, int64_t K, __m512i index[RUN / CHUNK]) {
    for (int j = 0; j < RUN / CHUNK; j++) {
        int32_t lanes[16];
        for (int l = 0; l < 16; l++)
            lanes[l] = group >= K ? 0 : (int32_t)((2 * j + l / 8) * BLOCK / group);
        index[j] = _mm512_loadu_si512((const void *)lanes);
    }
}

// The (up to 16) scales of a row that cover run r, as float32; groups past the row's last read as 0.
static inline __m512 run_scales(const uint16_t *row_scales, int64_t run, int64_t group, int64_t K,
                                int64_t n_groups) {
    int64_t first = group >= K ? 0 : run * RUN / group;
    int64_t count = n_groups - first < 16 ? n_groups - first : 16;
    __mmask16 mask = (__mmask16)((1u << count) - 1);
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, (const void *)(row_scales + first)));
}

typedef struct {
    int64_t K, Kp, chunks, n_groups, group;
} Shape;

// Dot products of one weight row with activation rows m0 .. m0 + tile - 1, into out[0 .. tile - 1].
static inline __attribute__((always_inline)) void row_dot(
        const uint8_t *row, const uint16_t *row_scales, const QuantizedActivations *act, int64_t m0, const int tile,
        const int bits, const Shape *shape, const __m512i *permutation, float *out) {
    const int64_t Kp = shape->Kp, chunks = shape->chunks;
    const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
    // Two accumulators per activation row, so consecutive multiply-adds do not wait on each other.
    __m512 acc[M_TILE], acc2[M_TILE];
    for (int t = 0; t < tile; t++) acc[t] = acc2[t] = _mm512_setzero_ps();
    for (int64_t run = 0; run * RUN < Kp; run++) {
        const __m512 run_ws = run_scales(row_scales, run, shape->group, shape->K, shape->n_groups);
        const int64_t first = run * (RUN / CHUNK);
        const int64_t last = first + RUN / CHUNK < chunks ? first + RUN / CHUNK : chunks;
        for (int64_t c = first; c < last; c += 2) {  // two 64-weight chunks a step: one 4-bit load holds both
            __m512i w_lo, w_hi;
            if (bits == 8) {
                w_lo = _mm512_loadu_si512((const void *)(row + c * CHUNK));
                w_hi = _mm512_loadu_si512((const void *)(row + (c + 1) * CHUNK));
            } else {
                __m512i packed = _mm512_loadu_si512((const void *)(row + c * CHUNK / 2));
                w_lo = _mm512_and_si512(packed, low_nibbles);
                w_hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
            }
            __m512 ws_lo = _mm512_permutexvar_ps(permutation[c - first], run_ws);
            __m512 ws_hi = _mm512_permutexvar_ps(permutation[c + 1 - first], run_ws);
            for (int t = 0; t < tile; t++) {
                const int64_t m = m0 + t;
                const int8_t *xq = act->codes + m * Kp + c * CHUNK;
                __m512i dot_lo = _mm512_dpbusd_epi32(act->negbias[m * chunks + c], w_lo,
                                                     _mm512_load_si512((const void *)xq));
                __m512i dot_hi = _mm512_dpbusd_epi32(act->negbias[m * chunks + c + 1], w_hi,
                                                     _mm512_load_si512((const void *)(xq + CHUNK)));
                acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot_lo), ws_lo),
                                         act->scales[m * chunks + c], acc[t]);
                acc2[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot_hi), ws_hi),
                                          act->scales[m * chunks + c + 1], acc2[t]);
            }
        }
    }
    for (int t = 0; t < tile; t++) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t], acc2[t]));
}

static inline void store_output(void *y, int is_bf16, int64_t index, float value) {
    if (is_bf16)
        ((uint16_t *)y)[index] = float_to_bf16(value);
    else
        ((float *)y)[index] = value;
}

// y (M, N) = x (M, K) @ W.T, W quantized as described at the top. x and y are float32, or bfloat16 when
// io_bf16. `group` is the weights per scale along a row (a multiple of 32, or >= K for one scale per row).
// Returns 0, or -1 when out of memory.
int qlinear(const void *x, const uint8_t *codes, const uint16_t *scales, void *y, int64_t M, int64_t N,
            int64_t K, int bits, int64_t group, int io_bf16, int n_threads) {
    const int64_t Kp = (K + 127) / 128 * 128;
    const int64_t chunks = Kp / CHUNK;
    const int64_t n_groups = (K + group - 1) / group;
    const int64_t row_bytes = bits == 8 ? Kp : Kp / 2;
    QuantizedActivations act;
    act.codes = (int8_t *)aligned_alloc(64, (size_t)(M * Kp));
    act.negbias = (__m512i *)aligned_alloc(64, sizeof(__m512i) * (size_t)(M * chunks));
    act.scales = (__m512 *)aligned_alloc(64, sizeof(__m512) * (size_t)(M * chunks));
    if (!act.codes || !act.negbias || !act.scales) {
        free(act.codes); free(act.negbias); free(act.scales);
        return -1;
    }
    __m512i permutation[RUN / CHUNK];
    run_permutations(group, K, permutation);
    quantize_activations(x, io_bf16, M, K, Kp, bits == 8 ? 128 : 8, &act);
    Shape shape = {K, Kp, chunks, n_groups, group};
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = codes + n * row_bytes;
        const uint16_t *row_scales = scales + n * n_groups;
        for (int64_t m0 = 0; m0 < M; m0 += M_TILE) {
            float out[M_TILE];
            // A constant tile size per call, so the accumulators live in registers.
            switch (M - m0 < M_TILE ? (int)(M - m0) : M_TILE) {
                case 1: row_dot(row, row_scales, &act, m0, 1, bits, &shape, permutation, out); break;
                case 2: row_dot(row, row_scales, &act, m0, 2, bits, &shape, permutation, out); break;
                case 3: row_dot(row, row_scales, &act, m0, 3, bits, &shape, permutation, out); break;
                default: row_dot(row, row_scales, &act, m0, 4, bits, &shape, permutation, out); break;
            }
            for (int t = 0; t < M_TILE && m0 + t < M; t++)
                store_output(y, io_bf16, (m0 + t) * N + n, out[t]);
        }
    }
    free(act.codes); free(act.negbias); free(act.scales);
    return 0;
}

// 16 weight codes of a row, from weight k on (k a multiple of 16), as signed int32 values.
static inline __m512i load16_codes(const uint8_t *row, int64_t k, int bits) {
    if (bits == 8)
        return _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + k))),
                                _mm512_set1_epi32(128));
    int64_t i = k % 128;
    __m128i bytes = _mm_loadu_si128((const __m128i *)(row + k / 128 * 64 + i % 64));
    __m128i nibbles = _mm_and_si128(i < 64 ? bytes : _mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
    return _mm512_sub_epi32(_mm512_cvtepu8_epi32(nibbles), _mm512_set1_epi32(8));
}

// The dense weight (N, K), float32 or bfloat16 (out_bf16), for the many-row (prefill) path.
void dequantize(const uint8_t *codes, const uint16_t *scales, void *out, int64_t N, int64_t K, int bits,
                int64_t group, int out_bf16, int n_threads) {
    const int64_t Kp = (K + 127) / 128 * 128;
    const int64_t n_groups = (K + group - 1) / group;
    const int64_t row_bytes = bits == 8 ? Kp : Kp / 2;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = codes + n * row_bytes;
        const uint16_t *row_scales = scales + n * n_groups;
        // Codes past K are zero, so the last 16 may run into the padding: only K values are stored.
        for (int64_t k = 0; k < K; k += 16) {
            // A run of 16 never straddles two groups: a group is a multiple of 32 or the whole row.
            __m512 values = _mm512_mul_ps(_mm512_cvtepi32_ps(load16_codes(row, k, bits)),
                                          _mm512_set1_ps(_cvtsh_ss(row_scales[k / group])));
            __mmask16 keep = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            if (out_bf16) {
                __m512i bits32 = _mm512_castps_si512(values);
                __m512i rounding = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                                    _mm512_and_si512(_mm512_srli_epi32(bits32, 16),
                                                                     _mm512_set1_epi32(1)));
                __m256i halves = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(bits32, rounding), 16));
                _mm256_mask_storeu_epi16((uint16_t *)out + n * K + k, keep, halves);
            } else {
                _mm512_mask_storeu_ps((float *)out + n * K + k, keep, values);
            }
        }
    }
}
