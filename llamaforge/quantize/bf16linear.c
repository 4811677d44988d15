// bfloat16 linear layers for a few activation rows, on x86 CPUs with AVX-512 BF16: the batch-1 decode path.
//
// y (M, N) = x (M, K) @ W.T with x, W and y in bfloat16. VDPBF16PS multiplies 32 bfloat16 pairs (exact in
// float32) and adds them into 16 float32 lanes, so one 64-byte weight load feeds one instruction per activation
// row and decoding streams the weights at memory speed; torch's bfloat16 GEMM at one row reaches about half of
// that here (docs/benchmarks.md). Sums are float32; the output is rounded to bfloat16 once, to nearest even.
//
// Built by llamaforge/quantize/kernels.py with -O3 -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -fopenmp, only on
// CPUs that have AVX-512 BF16; loaded with ctypes.

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 32   // bfloat16 values per 64-byte register
#define M_TILE 4   // activation rows that share each loaded weight chunk

static inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    bits += 0x7FFF + ((bits >> 16) & 1);  // round to nearest even, as torch's .to(torch.bfloat16)
    return (uint16_t)(bits >> 16);
}

// Dot products of one weight row with activation rows m0 .. m0 + tile - 1 (x padded to Kp with zeros).
static inline __attribute__((always_inline)) void row_dot(const uint16_t *row, const uint16_t *x, int64_t K,
                                                          int64_t Kp, int64_t m0, const int tile, float *out) {
    __m512 acc[M_TILE], acc2[M_TILE];
    for (int t = 0; t < tile; t++) acc[t] = acc2[t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 2 * LANES <= K; k += 2 * LANES) {  // two chunks a step: two independent accumulators
        __m512i w0 = _mm512_loadu_si512((const void *)(row + k));
        __m512i w1 = _mm512_loadu_si512((const void *)(row + k + LANES));
        for (int t = 0; t < tile; t++) {
            const uint16_t *xr = x + (m0 + t) * Kp + k;
            acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_loadu_si512((const void *)xr), (__m512bh)w0);
            acc2[t] = _mm512_dpbf16_ps(acc2[t], (__m512bh)_mm512_loadu_si512((const void *)(xr + LANES)),
                                       (__m512bh)w1);
        }
    }
    for (; k < K; k += LANES) {  // the tail: masked so nothing past the row is read
        __mmask32 keep = K - k >= LANES ? 0xFFFFFFFFu : (__mmask32)((1ull << (K - k)) - 1);
        __m512i w = _mm512_maskz_loadu_epi16(keep, (const void *)(row + k));
        for (int t = 0; t < tile; t++) {
            const uint16_t *xr = x + (m0 + t) * Kp + k;
            acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_loadu_si512((const void *)xr), (__m512bh)w);
        }
    }
    for (int t = 0; t < tile; t++) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t], acc2[t]));
}

// y (M, N) = x (M, K) @ W.T, all bfloat16 (raw uint16 bits). Returns 0, or -1 when out of memory.
int bf16_linear(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K, int n_threads) {
    const int64_t Kp = (K + LANES - 1) / LANES * LANES;
    // The activations padded with zeros to whole registers, so the tail reads no garbage from x.
    uint16_t *padded = (uint16_t *)calloc((size_t)(M * Kp), sizeof(uint16_t));
    if (!padded) return -1;
    for (int64_t m = 0; m < M; m++) memcpy(padded + m * Kp, x + m * K, sizeof(uint16_t) * (size_t)K);

    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *row = w + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += M_TILE) {
            float out[M_TILE];
            // A constant tile size per call, so the accumulators live in registers.
            switch (M - m0 < M_TILE ? (int)(M - m0) : M_TILE) {
                case 1: row_dot(row, padded, K, Kp, m0, 1, out); break;
                case 2: row_dot(row, padded, K, Kp, m0, 2, out); break;
                case 3: row_dot(row, padded, K, Kp, m0, 3, out); break;
                default: row_dot(row, padded, K, Kp, m0, 4, out); break;
            }
            for (int t = 0; t < M_TILE && m0 + t < M; t++) y[(m0 + t) * N + n] = float_to_bf16(out[t]);
        }
    }
    free(padded);
    return 0;
}
