// bfloat16 linear layers for a few activation rows, and attention over a KV cache, on x86 CPUs with AVX-512 BF16:
// the batch-1 decode path (and every attention over the cache of a bfloat16 CPU model).
//
// y (M, N) = x (M, K) @ W.T with x, W and y in bfloat16. VDPBF16PS multiplies 32 bfloat16 pairs (exact in
// float32) and adds them into 16 float32 lanes, so one 64-byte weight load feeds one instruction per activation
// row and decoding streams the weights at memory speed; torch's bfloat16 GEMM at one row reaches about half of
// that here (docs/benchmarks.md). Sums are float32; the output is rounded to bfloat16 once, to nearest even.
//
// Built by llamaforge/quantize/kernels.py with -O3 -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -fopenmp, only on
// CPUs that have AVX-512 BF16; loaded with ctypes.

#ifndef LLAMAFORGE_EMULATE_AVX512  // kernels.py builds an emulated copy for tests (avx512_emulation.h)
#include <immintrin.h>
#endif
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#define LANES 32   // bfloat16 values per 64-byte register
#define M_TILE 4   // activation rows that share each loaded weight chunk
#ifdef LLAMAFORGE_AVX2
#define QUAD 2     // weight rows of quad_dot: AVX2's registers hold half as many sums (4 was 1.23x slower)
#define PANEL 8    // quads a task (weight_quads): an activation tile stays in L1 while they pass; 1.1-1.2x on Zen 3
#define K_BLOCK 2048  // values of each activation row a pass of weight_quads over its panel
#else
#define QUAD 4     // weight rows of the many-row path (quad_dot)
#define PANEL 1    // quads a task (weight_quads); more is unmeasured on AVX-512
#endif
#define QUAD_MIN_ROWS 4  // more activation rows than this take quad_dot
#define ROW_BLOCK_BYTES (384 * 1024)  // activation rows a block: their bytes stay in a core's L2 (1 MB on Zen 4)

static inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    bits += 0x7FFF + ((bits >> 16) & 1);  // round to nearest even, as torch's .to(torch.bfloat16)
    return (uint16_t)(bits >> 16);
}

// Dot products of one weight row (K values) with activation rows m0 .. m0 + tile - 1 (x padded to Kp with zeros)
// into out[t]. Every sum runs in one order whatever tile, M or the blocking: two accumulators over alternate
// 32-value chunks, a masked tail into the first, then one reduction. So a row's outputs do not depend on the other
// rows computed with it (a prompt's numbers do not depend on its chunking or batching). One weight row at a time
// streams fastest: two or four rows read side by side made a batch-1 product 1.4-2x slower (docs/benchmarks.md).
static inline __attribute__((always_inline)) void row_dot(const uint16_t *row, const uint16_t *x, int64_t K,
                                                          int64_t Kp, int64_t m0, const int tile, float out[M_TILE]) {
    __m512 acc[M_TILE], acc2[M_TILE];
    for (int t = 0; t < tile; t++) acc[t] = acc2[t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 2 * LANES <= K; k += 2 * LANES) {  // two chunks a step: two independent accumulators
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(row + k));
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void *)(row + k + LANES));
        for (int t = 0; t < tile; t++) {  // each weight chunk loaded once for the tile's activation rows
            const uint16_t *xr = x + (m0 + t) * Kp + k;
            acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_loadu_si512((const void *)xr), w0);
            acc2[t] = _mm512_dpbf16_ps(acc2[t], (__m512bh)_mm512_loadu_si512((const void *)(xr + LANES)), w1);
        }
    }
    for (; k < K; k += LANES) {  // the tail: masked so nothing past the row is read
        __mmask32 keep = K - k >= LANES ? 0xFFFFFFFFu : (__mmask32)((1ull << (K - k)) - 1);
        const __m512bh wt = (__m512bh)_mm512_maskz_loadu_epi16(keep, (const void *)(row + k));
        for (int t = 0; t < tile; t++)
            acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_loadu_si512((const void *)(x + (m0 + t) * Kp + k)),
                                      wt);
    }
    for (int t = 0; t < tile; t++) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t], acc2[t]));
}

// Column n of y (M, N): weight row n (`row`) dotted with the M rows of x, padded with zeros to Kp.
static inline __attribute__((always_inline)) void weight_row(const uint16_t *row, const uint16_t *padded, int64_t K,
                                                             int64_t Kp, int64_t M, int64_t N, int64_t n,
                                                             uint16_t *y) {
    for (int64_t m0 = 0; m0 < M; m0 += M_TILE) {
        float out[M_TILE];
        // Constant tile sizes per call, so the accumulators live in registers.
        const int tile = M - m0 < M_TILE ? (int)(M - m0) : M_TILE;
        switch (tile) {
            case 1: row_dot(row, padded, K, Kp, m0, 1, out); break;
            case 2: row_dot(row, padded, K, Kp, m0, 2, out); break;
            case 3: row_dot(row, padded, K, Kp, m0, 3, out); break;
            default: row_dot(row, padded, K, Kp, m0, 4, out); break;
        }
        for (int t = 0; t < tile; t++) y[(m0 + t) * N + n] = float_to_bf16(out[t]);
    }
}

#ifdef LLAMAFORGE_AVX2
// Sixteen bfloat16s (one 16-value half of a 32-value chunk) as float32: the odd ones (the high halves of their
// 32-bit pairs) and the even ones, the operands of VDPBF16PS's two FMAs.
static inline __attribute__((always_inline)) void unpack_bf16(__m256i values, __m256 *odd, __m256 *even) {
    *odd = _mm256_castsi256_ps(_mm256_and_si256(values, _mm256_set1_epi32((int)0xFFFF0000)));
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(values, 16));
}

// One step of one chain: sums[j][t] += weight half-chunk wv[j] . activation half-chunk of row t (at xk, rows Kp
// apart), the odd pair first, as avx2_vectors.h's VDPBF16PS.
static inline __attribute__((always_inline)) void chain_step(const __m256i wv[QUAD], const uint16_t *xk, int64_t Kp,
                                                             const int tile, __m256 sums[QUAD][M_TILE]) {
    __m256 odd_w[QUAD], even_w[QUAD];
    for (int j = 0; j < QUAD; j++) unpack_bf16(wv[j], &odd_w[j], &even_w[j]);
    for (int t = 0; t < tile; t++) {
        __m256 odd_x, even_x;
        unpack_bf16(_mm256_loadu_si256((const __m256i *)(xk + t * Kp)), &odd_x, &even_x);
        for (int j = 0; j < QUAD; j++)
            sums[j][t] = _mm256_fmadd_ps(even_x, even_w[j], _mm256_fmadd_ps(odd_x, odd_w[j], sums[j][t]));
    }
}

// The many-row path on AVX2, where row_dot's __m512 accumulators are pairs of 8-lane halves: each of its two
// accumulators is two chains (the low and the high 16 values of each chunk) that never meet until the reduction.
// One chain runs at a time, so its QUAD x M_TILE sums, the unpacked weights and one unpacked activation half fit
// AVX2's 16 registers (both halves at once, as the AVX-512 code below, spill: 1.24x slower on one 96x2048 by
// 256x2048 product). quad_chains continues the four chains of weight rows n0 .. n0 + QUAD - 1 with activation rows
// m0 .. m0 + tile - 1 over the chunk pairs in [begin, end) (end <= K2), and over the tail when end is K2.
static inline __attribute__((always_inline)) void quad_chains(const uint16_t *w, int64_t n0, const uint16_t *x,
                                                              int64_t K, int64_t Kp, int64_t m0, const int tile,
                                                              int64_t begin, int64_t end,
                                                              __m256 chains[2][2][QUAD][M_TILE]) {
    const int64_t K2 = K / (2 * LANES) * (2 * LANES);  // where row_dot's two-chunk steps end
    const uint16_t *rows = w + n0 * K, *xs = x + m0 * Kp;
    for (int parity = 0; parity < 2; parity++) {  // [odd chunks][high half]
        for (int half = 0; half < 2; half++) {
            __m256 sums[QUAD][M_TILE];
            for (int j = 0; j < QUAD; j++)
                for (int t = 0; t < tile; t++) sums[j][t] = chains[parity][half][j][t];
            const int64_t offset = half * (LANES / 2);
            for (int64_t k = begin + parity * LANES + offset; k < end; k += 2 * LANES) {
                __m256i wv[QUAD];
                for (int j = 0; j < QUAD; j++) wv[j] = _mm256_loadu_si256((const __m256i *)(rows + j * K + k));
                chain_step(wv, xs + k, Kp, tile, sums);
            }
            for (int64_t chunk = K2; end == K2 && parity == 0 && chunk < K; chunk += LANES) {  // row_dot's tail
                const int64_t k = chunk + offset, valid = K - k < LANES / 2 ? K - k : LANES / 2;
                __m256i wv[QUAD];
                for (int j = 0; j < QUAD; j++) {  // zeros past the row's end (never the next row's values)
                    uint16_t buffer[LANES / 2] = {0};
                    if (valid > 0) memcpy(buffer, rows + j * K + k, sizeof(uint16_t) * (size_t)valid);
                    wv[j] = _mm256_loadu_si256((const __m256i *)buffer);
                }
                chain_step(wv, xs + k, Kp, tile, sums);
            }
            for (int j = 0; j < QUAD; j++)
                for (int t = 0; t < tile; t++) chains[parity][half][j][t] = sums[j][t];
        }
    }
}

// The chains' sums as row_dot ends its own: _mm512_add_ps(acc, acc2), half by half, then the reduction.
static inline void reduce_chains(__m256 chains[2][2][QUAD][M_TILE], const int tile, float out[QUAD][M_TILE]) {
    for (int j = 0; j < QUAD; j++)
        for (int t = 0; t < tile; t++) {
            __m512 sum;
            sum.h[0] = _mm256_add_ps(chains[0][0][j][t], chains[1][0][j][t]);
            sum.h[1] = _mm256_add_ps(chains[0][1][j][t], chains[1][1][j][t]);
            out[j][t] = _mm512_reduce_add_ps(sum);
        }
}

// Columns n0 .. n0 + quads * QUAD - 1 of y (M, N), as weight_row computes them: for each tile of activation rows,
// every quad's chains over K_BLOCK values of the rows before the next K_BLOCK, so the tile's slice stays in L1 while
// the panel's weight rows pass over it. quads <= PANEL.
static void weight_quads(const uint16_t *w, int64_t n0, int64_t quads, const uint16_t *padded, int64_t K, int64_t Kp,
                         int64_t M, int64_t N, uint16_t *y) {
    const int64_t K2 = K / (2 * LANES) * (2 * LANES);
    __m256 chains[PANEL][2][2][QUAD][M_TILE];
    for (int64_t m0 = 0; m0 < M; m0 += M_TILE) {
        const int tile = M - m0 < M_TILE ? (int)(M - m0) : M_TILE;
        memset(chains, 0, sizeof(chains[0]) * (size_t)quads);
        for (int64_t begin = 0; begin == 0 || begin < K2; begin += K_BLOCK) {
            const int64_t end = K2 - begin < K_BLOCK ? K2 : begin + K_BLOCK;
            for (int64_t q = 0; q < quads; q++) {
                switch (tile) {  // constant tile sizes, so the sums live in registers
                    case 1: quad_chains(w, n0 + q * QUAD, padded, K, Kp, m0, 1, begin, end, chains[q]); break;
                    case 2: quad_chains(w, n0 + q * QUAD, padded, K, Kp, m0, 2, begin, end, chains[q]); break;
                    case 3: quad_chains(w, n0 + q * QUAD, padded, K, Kp, m0, 3, begin, end, chains[q]); break;
                    default: quad_chains(w, n0 + q * QUAD, padded, K, Kp, m0, 4, begin, end, chains[q]); break;
                }
            }
        }
        for (int64_t q = 0; q < quads; q++) {
            float out[QUAD][M_TILE];
            reduce_chains(chains[q], tile, out);
            for (int j = 0; j < QUAD; j++)
                for (int t = 0; t < tile; t++) y[(m0 + t) * N + n0 + q * QUAD + j] = float_to_bf16(out[j][t]);
        }
    }
}
#else
// Weight rows n0 .. n0 + QUAD - 1 with activation rows m0 .. m0 + tile - 1 into out[j][t], each sum in row_dot's order
// but with one register per sum: row_dot's two accumulators take the even and the odd 32-value chunks, and they
// are independent until the end, so the even chunks (and the tail) go first, the odd ones second, then the same add
// and reduction. QUAD x M_TILE sums in registers share each load of QUAD weight and M_TILE activation chunks.
static inline __attribute__((always_inline)) void quad_dot(const uint16_t *w, int64_t n0, const uint16_t *x,
                                                           int64_t K, int64_t Kp, int64_t m0, const int tile,
                                                           float out[QUAD][M_TILE]) {
    const int64_t K2 = K / (2 * LANES) * (2 * LANES);  // where row_dot's two-chunk steps end
    __m512 even[QUAD][M_TILE], acc[QUAD][M_TILE];
    for (int pass = 0; pass < 2; pass++) {
        for (int j = 0; j < QUAD; j++)
            for (int t = 0; t < tile; t++) acc[j][t] = _mm512_setzero_ps();
        for (int64_t k = pass * LANES; k < K2; k += 2 * LANES) {
            __m512i wk[QUAD];
            for (int j = 0; j < QUAD; j++) wk[j] = _mm512_loadu_si512((const void *)(w + (n0 + j) * K + k));
            for (int t = 0; t < tile; t++) {
                const __m512bh xk = (__m512bh)_mm512_loadu_si512((const void *)(x + (m0 + t) * Kp + k));
                for (int j = 0; j < QUAD; j++) acc[j][t] = _mm512_dpbf16_ps(acc[j][t], xk, (__m512bh)wk[j]);
            }
        }
        if (pass == 0) {
            for (int64_t k = K2; k < K; k += LANES) {  // the tail, into the first accumulator as in row_dot
                __mmask32 keep = K - k >= LANES ? 0xFFFFFFFFu : (__mmask32)((1ull << (K - k)) - 1);
                __m512i wk[QUAD];
                for (int j = 0; j < QUAD; j++)
                    wk[j] = _mm512_maskz_loadu_epi16(keep, (const void *)(w + (n0 + j) * K + k));
                for (int t = 0; t < tile; t++) {
                    const __m512bh xk = (__m512bh)_mm512_loadu_si512((const void *)(x + (m0 + t) * Kp + k));
                    for (int j = 0; j < QUAD; j++) acc[j][t] = _mm512_dpbf16_ps(acc[j][t], xk, (__m512bh)wk[j]);
                }
            }
            for (int j = 0; j < QUAD; j++)
                for (int t = 0; t < tile; t++) even[j][t] = acc[j][t];
        }
    }
    for (int j = 0; j < QUAD; j++)
        for (int t = 0; t < tile; t++) out[j][t] = _mm512_reduce_add_ps(_mm512_add_ps(even[j][t], acc[j][t]));
}

// Columns n0 .. n0 + quads * QUAD - 1 of y (M, N), as weight_row computes them: every quad's product with one tile of
// activation rows before the next tile, so the tile stays in L1 while the panel's weight rows pass over it.
static void weight_quads(const uint16_t *w, int64_t n0, int64_t quads, const uint16_t *padded, int64_t K, int64_t Kp,
                         int64_t M, int64_t N, uint16_t *y) {
    for (int64_t m0 = 0; m0 < M; m0 += M_TILE) {
        const int tile = M - m0 < M_TILE ? (int)(M - m0) : M_TILE;
        for (int64_t n = n0; n < n0 + quads * QUAD; n += QUAD) {
            float out[QUAD][M_TILE];
            switch (tile) {
                case 1: quad_dot(w, n, padded, K, Kp, m0, 1, out); break;
                case 2: quad_dot(w, n, padded, K, Kp, m0, 2, out); break;
                case 3: quad_dot(w, n, padded, K, Kp, m0, 3, out); break;
                default: quad_dot(w, n, padded, K, Kp, m0, 4, out); break;
            }
            for (int j = 0; j < QUAD; j++)
                for (int t = 0; t < tile; t++) y[(m0 + t) * N + n + j] = float_to_bf16(out[j][t]);
        }
    }
}
#endif

// y (M, N) = x (M, K) @ W.T, all bfloat16 (raw uint16 bits). Returns 0, or -1 when out of memory. Rows of x go in
// blocks of about ROW_BLOCK_BYTES, so that a block stays in each core's L2 while every weight row passes over it (a
// prompt's 2,048 rows would not); weight rows go in panels of PANEL x QUAD (weight_quads) for more than QUAD_MIN_ROWS
// rows, else one at a time (row_dot).
// The many-row paths are 1.4-2x the one-row-at-a-time loop they replaced (8-512 rows) and within 0.8-1.0x of
// torch's GEMM up to 16 rows (docs/benchmarks.md); every output is the same bits either way.
int bf16_linear(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K, int n_threads) {
    const int64_t Kp = (K + LANES - 1) / LANES * LANES;
    // The activations padded with zeros to whole registers, so the tail reads no garbage from x.
    uint16_t *padded = (uint16_t *)calloc((size_t)(M * Kp), sizeof(uint16_t));
    if (!padded) return -1;
    for (int64_t m = 0; m < M; m++) memcpy(padded + m * Kp, x + m * K, sizeof(uint16_t) * (size_t)K);
    int64_t block = ROW_BLOCK_BYTES / (2 * Kp) / M_TILE * M_TILE;
    if (block < M_TILE) block = M_TILE;
    for (int64_t b0 = 0; b0 < M; b0 += block) {
        const int64_t rows = M - b0 < block ? M - b0 : block;
        const uint16_t *xb = padded + b0 * Kp;
        uint16_t *yb = y + b0 * N;
        if (rows > QUAD_MIN_ROWS) {
            const int64_t quads = N / QUAD, panels = (quads + PANEL - 1) / PANEL;
            #pragma omp parallel for num_threads(n_threads) schedule(static)
            for (int64_t p = 0; p < panels; p++)
                weight_quads(w, p * PANEL * QUAD, quads - p * PANEL < PANEL ? quads - p * PANEL : PANEL, xb, K, Kp,
                             rows, N, yb);
            for (int64_t n = quads * QUAD; n < N; n++) weight_row(w + n * K, xb, K, Kp, rows, N, n, yb);
            continue;
        }
        #pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int64_t n = 0; n < N; n++) weight_row(w + n * K, xb, K, Kp, rows, N, n, yb);
    }
    free(padded);
    return 0;
}

// e^x for 16 floats (x <= 0 here: softmax after subtracting the maximum), to about 2 ulp: x = n ln2 + r with
// |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial, then scaled by 2^n. -inf gives exactly 0.
static inline __m512 exp16(__m512 x) {
    const __mmask16 finite = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  // keeps 2^n normal; e^-87 is as good as 0 beside e^0
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 split in two for accuracy
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(finite, _mm512_scalef_ps(p, n));  // masked positions weigh exactly 0
}

static inline __m512 bf16x16_to_float(const uint16_t *values) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)values)),
                                                 16));
}

// 16 floats rounded to bfloat16 and back (nearest even, as torch's .to(torch.bfloat16)).
static inline __m512 round16_to_bf16(__m512 values) {
    __m512i bits = _mm512_castps_si512(values);
    __m512i rounding = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                        _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)));
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_add_epi32(bits, rounding), _mm512_set1_epi32((int)0xFFFF0000)));
}

// 16 floats as bfloat16 bits, rounded to nearest even.
static inline __m256i to_bf16_bits(__m512 values) {
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round16_to_bf16(values)), 16));
}

#ifdef LLAMAFORGE_AVX2
// The lane sums of 16 vectors, lane j holding v[j]'s, by AVX2's horizontal adds (it has no two-source permute):
// each vector's halves added, then eight at a time transposed by pairwise sums.
static inline __m512 sum16(__m512 v[16]) {
    __m256 halves[16];
    for (int j = 0; j < 16; j++) halves[j] = _mm256_add_ps(v[j].h[0], v[j].h[1]);
    __m512 sums;
    for (int i = 0; i < 2; i++) {
        const __m256 *s = halves + 8 * i;  // low 128 bits: sums of lanes 0-3 of s[0..3]; high: lanes 4-7
        const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
        const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
        sums.h[i] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    }
    return sums;
}
#else
// The lane sums of 16 vectors, lane j holding v[j]'s: each round adds the halves of pairs of vectors, so 16
// horizontal sums cost 45 instructions instead of 16 reductions.
static inline __m512 sum16(__m512 v[16]) {
    static const int32_t halves[4][2][16] = {
        {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
         {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}},
        {{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
         {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31}},
        {{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
         {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31}},
        {{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
         {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}},
    };
    int count = 16;
    for (int round = 0; round < 4; round++) {
        const __m512i low = _mm512_loadu_si512((const void *)halves[round][0]);
        const __m512i high = _mm512_loadu_si512((const void *)halves[round][1]);
        for (int i = 0; i < count / 2; i++)
            v[i] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * i], low, v[2 * i + 1]),
                                 _mm512_permutex2var_ps(v[2 * i], high, v[2 * i + 1]));
        count /= 2;
    }
    return v[0];
}
#endif

// The attention weights of one query (item = (b * H + h) * T + t) of bf16_decode_attention, over the keys of its
// key-value head, into `weights` (room for L rounded up to 16 floats), each rounded to bfloat16; `visible` is its
// row of the mask (NULL: all L positions). Returns how many positions the query reads: those past its last visible
// one would add only zeros (a causal query of a prompt's chunk skips the later tokens), so a query's numbers are the
// same whatever follows it. Position l's key is at keys + offsets[l].
static inline int64_t attention_weights(const uint16_t *query, const uint16_t *keys, const int64_t *offsets,
                                        const uint8_t *visible, int64_t D, int64_t L, float *weights) {
    while (visible != NULL && L > 0 && !visible[L - 1]) L--;
    const int64_t Lp = (L + 15) / 16 * 16;
    const __m512 scale = _mm512_set1_ps(1.0f / sqrtf((float)D)), minus_infinity = _mm512_set1_ps(-INFINITY);
    // The query as bfloat16 pairs for VDPBF16PS (32 values a register), and its last 16 values as floats when
    // D is not a multiple of 32.
    const int64_t paired = D / 32 * 32;
    __m512i pairs[8];
    for (int64_t d = 0; d < paired; d += 32) pairs[d / 32] = _mm512_loadu_si512((const void *)(query + d));
    const __m512 tail = paired < D ? bf16x16_to_float(query + paired) : _mm512_setzero_ps();
    // Scores, 16 positions at a time (lane j: position l0 + j).
    __m512 top = minus_infinity;
    for (int64_t l0 = 0; l0 < Lp; l0 += 16) {
        __m512 dots[16];
        for (int j = 0; j < 16; j++) {
            dots[j] = _mm512_setzero_ps();
            if (l0 + j >= L) continue;
            const uint16_t *key = keys + offsets[l0 + j];
            for (int64_t d = 0; d < paired; d += 32)  // products of bfloat16 values are exact in float32
                dots[j] = _mm512_dpbf16_ps(dots[j], (__m512bh)pairs[d / 32],
                                           (__m512bh)_mm512_loadu_si512((const void *)(key + d)));
            if (paired < D) dots[j] = _mm512_fmadd_ps(tail, bf16x16_to_float(key + paired), dots[j]);
        }
        const __mmask16 in_range = (__mmask16)(L - l0 >= 16 ? 0xFFFF : (1u << (L - l0)) - 1);
        const __mmask16 seen = visible == NULL ? in_range
                               : _mm_mask_test_epi8_mask(in_range, _mm_maskz_loadu_epi8(in_range, visible + l0),
                                                         _mm_set1_epi8((char)0xFF));
        __m512 scores = _mm512_mask_blend_ps(seen, minus_infinity,
                                             _mm512_mul_ps(round16_to_bf16(sum16(dots)), scale));
        _mm512_store_ps(weights + l0, scores);
        top = _mm512_max_ps(top, scores);
    }
    float highest = _mm512_reduce_max_ps(top);
    if (highest == -INFINITY) highest = 0.0f;  // nothing visible: torch gives NaN; every weight is 0 here
    __m512 total = _mm512_setzero_ps();
    for (int64_t l = 0; l < Lp; l += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_load_ps(weights + l), _mm512_set1_ps(highest)));
        _mm512_store_ps(weights + l, e);
        total = _mm512_add_ps(total, e);
    }
    const float sum = _mm512_reduce_add_ps(total);
    const __m512 inverse = _mm512_set1_ps(sum > 0.0f ? 1.0f / sum : 0.0f);
    for (int64_t l = 0; l < Lp; l += 16)
        _mm512_store_ps(weights + l, round16_to_bf16(_mm512_mul_ps(_mm512_load_ps(weights + l), inverse)));
    return L;
}

// Queries that read one key-value head share each loaded pair of its values, as long as their accumulators fit 16
// registers: 4 of head size 64, 2 of 128, 1 of 256 (AVX2, whose 16 registers hold half as much: 2 of 64, 1 of 128).
#define GROUP_QUERIES 4
#ifdef LLAMAFORGE_AVX2
#define ACCUMULATORS 8
#else
#define ACCUMULATORS 16
#endif

static inline int64_t group_queries(int64_t D) {
    const int64_t fit = D > 16 * ACCUMULATORS ? 1 : ACCUMULATORS / (D / 16);
    return fit < GROUP_QUERIES ? fit : GROUP_QUERIES;
}

// The groups of queries bf16_decode_attention splits its work into: per row and key-value head, its H / Hkv heads
// at each of T positions, `group_queries(D)` at a time (position-major: one group's queries see the same positions
// where their heads share a key-value head).
static inline int64_t attention_groups(int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t D) {
    const int64_t queries = H / Hkv * T, per_group = group_queries(D);
    return B * Hkv * ((queries + per_group - 1) / per_group);
}

// The weighted sums of values for `count` (<= `queries`) queries of one key-value head: query i's `lengths[i]`
// weights at `weights + i * Lp`, its output at `outs[i]`. Two positions at a time: their values interleaved into
// bfloat16 pairs once, then times each query's pair of (bfloat16) weights, by VDPBF16PS; exact products, float32
// sums. A query skips the pairs where both its weights are 0, and its last pair's second value is 0 when its
// length is odd: each query's sums are those it would get alone. Position l's value is at values + offsets[l].
static inline __attribute__((always_inline)) void weighted_values(const int chunks, const int queries, int count,
                                                                  const float *weights, int64_t Lp,
                                                                  const int64_t *lengths, const uint16_t *values,
                                                                  const int64_t *offsets, uint16_t *const *outs) {
    __m512 acc[16];
    for (int a = 0; a < queries * chunks; a++) acc[a] = _mm512_setzero_ps();
    int64_t longest = 0;
    for (int i = 0; i < count; i++) longest = lengths[i] > longest ? lengths[i] : longest;
    for (int64_t l = 0; l < longest; l += 2) {
        uint32_t both[GROUP_QUERIES];
        int uses = 0;  // bit i: query i has a nonzero weight in this pair
        for (int i = 0; i < queries; i++) {
            const float first = i < count && l < lengths[i] ? weights[i * Lp + l] : 0.0f;
            const float second = i < count && l + 1 < lengths[i] ? weights[i * Lp + l + 1] : 0.0f;
            both[i] = float_to_bf16(first) | (uint32_t)float_to_bf16(second) << 16;
            uses |= (first != 0.0f || second != 0.0f) << i;
        }
        if (!uses) continue;
        const uint16_t *first = values + offsets[l], *second = l + 1 < longest ? values + offsets[l + 1] : first;
        __m512i pairs[16];
        for (int d = 0; d < chunks; d++) {
            const __m512i low = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(first + d * 16)));
            pairs[d] = l + 1 >= longest ? low : _mm512_or_si512(low, _mm512_slli_epi32(
                                              _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(second + d * 16))), 16));
        }
        for (int i = 0; i < queries; i++) {
            if (!(uses >> i & 1)) continue;
            const __m512bh w = (__m512bh)_mm512_set1_epi32((int)both[i]);
            if (l + 1 >= lengths[i]) {  // its last position alone: the pair's second value 0
                for (int d = 0; d < chunks; d++)
                    acc[i * chunks + d] = _mm512_dpbf16_ps(acc[i * chunks + d], (__m512bh)_mm512_cvtepu16_epi32(
                        _mm256_loadu_si256((const __m256i *)(first + d * 16))), w);
                continue;
            }
            for (int d = 0; d < chunks; d++)
                acc[i * chunks + d] = _mm512_dpbf16_ps(acc[i * chunks + d], (__m512bh)pairs[d], w);
        }
    }
    for (int i = 0; i < count; i++)
        for (int d = 0; d < chunks; d++)
            _mm256_storeu_si256((__m256i *)(outs[i] + d * 16), to_bf16_bits(acc[i * chunks + d]));
}

// One group of queries (see attention_groups) of bf16_decode_attention, with `weights` room for
// group_queries(D) x (L rounded up to 16) floats. Row b's position l holds key-value head h at
// k + offsets[b * offsets_stride + l] + h * kv_stride_h (v alike): a contiguous cache's rows or a paged one's blocks.
static inline void attend_group(int64_t group, const uint16_t *q, const uint16_t *k, const uint16_t *v,
                                const uint8_t *mask, uint16_t *out, int64_t H, int64_t Hkv, int64_t T, int64_t D,
                                int64_t L, const int64_t *offsets, int64_t offsets_stride, int64_t kv_stride_h,
                                float *weights) {
    const int64_t G = H / Hkv, per_group = group_queries(D), groups = (G * T + per_group - 1) / per_group;
    const int64_t b = group / (Hkv * groups), kv_head = group / groups % Hkv, first = group % groups * per_group;
    const int count = (int)(G * T - first < per_group ? G * T - first : per_group);
    const int64_t Lp = (L + 15) / 16 * 16;
    const uint16_t *keys = k + kv_head * kv_stride_h, *values = v + kv_head * kv_stride_h;
    const int64_t *row_offsets = offsets + b * offsets_stride;
    int64_t lengths[GROUP_QUERIES];
    uint16_t *outs[GROUP_QUERIES];
    for (int i = 0; i < count; i++) {
        const int64_t t = (first + i) / G, h = kv_head * G + (first + i) % G, item = (b * H + h) * T + t;
        const uint8_t *visible = mask == NULL ? NULL : mask + (b * T + t) * L;
        lengths[i] = attention_weights(q + item * D, keys, row_offsets, visible, D, L, weights + i * Lp);
        outs[i] = out + item * D;
    }
    // Constant sizes for Llama's head sizes, so the accumulators live in registers.
    if (D == 64 && per_group == 4)
        weighted_values(4, 4, count, weights, Lp, lengths, values, row_offsets, outs);
    else if (D == 64 && per_group == 2)
        weighted_values(4, 2, count, weights, Lp, lengths, values, row_offsets, outs);
    else if (D == 128 && per_group == 2)
        weighted_values(8, 2, count, weights, Lp, lengths, values, row_offsets, outs);
    else if (D == 128 && per_group == 1)
        weighted_values(8, 1, count, weights, Lp, lengths, values, row_offsets, outs);
    else
        for (int i = 0; i < count; i++)
            weighted_values((int)(D / 16), 1, 1, weights + i * Lp, Lp, lengths + i, values, row_offsets, outs + i);
}

// Attention of new queries over a KV cache: out (B, H, T, D) = softmax(q k^T / sqrt(D)) v with q (B, H, T, D)
// contiguous; row b's position l of k and v at element offsets[b * offsets_stride + l] (plus h * kv_stride_h for
// key-value head h: see attend_group), offsets_stride >= L; and mask (B, T, L) bytes, nonzero where a query sees a
// position. Query head h reads key-value head h / (H / Hkv). It rounds where torch's
// two bfloat16 matmuls and float softmax do (model.decode_attention): scores to bfloat16 before scaling, the weights
// to bfloat16, the output once; sums are float32. Each query's arithmetic is its own, in a fixed order over the
// positions it sees: a prompt's chunk gets the numbers its tokens get decoded one by one. D a multiple of 16, at
// most 256. Returns 0, or -1 when out of memory (or D is not one of those).
int bf16_decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask,
                          uint16_t *out, int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t D, int64_t L,
                          const int64_t *offsets, int64_t offsets_stride, int64_t kv_stride_h, int n_threads) {
    if (D > 256 || D % 16 != 0) return -1;
    const int64_t room = group_queries(D) * ((L + 15) / 16 * 16);  // one group's weights
    float *scratch = (float *)aligned_alloc(64, sizeof(float) * (size_t)(n_threads * room));
    if (!scratch) return -1;
    #pragma omp parallel num_threads(n_threads)
    {
        float *weights = scratch + omp_get_thread_num() * room;
        #pragma omp for schedule(static)
        for (int64_t group = 0; group < attention_groups(B, H, Hkv, T, D); group++)
            attend_group(group, q, k, v, mask, out, H, Hkv, T, D, L, offsets, offsets_stride, kv_stride_h, weights);
    }
    free(scratch);
    return 0;
}
