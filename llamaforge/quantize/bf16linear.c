// bfloat16 linear layers for a few activation rows, and attention over a KV cache, on x86 CPUs with AVX-512 BF16:
// the batch-1 decode path (and every attention over the cache of a bfloat16 CPU model).
//
// y (M, N) = x (M, K) @ W.T with x, W and y in bfloat16. VDPBF16PS multiplies 32 bfloat16 pairs (exact in
// float32) and adds them into 16 float32 lanes, so one 64-byte weight load feeds one instruction per activation
// row and decoding streams the weights at memory speed; torch's bfloat16 GEMM at one row reaches about half of
// that here (docs/benchmarks.md). Sums are float32; the output is rounded to bfloat16 once, to nearest even.
//
// Built by llamaforge/quantize/kernels.py with -O3 -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -fopenmp on CPUs
// that have AVX-512 BF16, or for AVX2 with avx2_vectors.h (where the linear layers' dot products have their own
// order and tiles, below); loaded with ctypes.

#ifndef LLAMAFORGE_EMULATE_AVX512  // kernels.py builds an emulated copy for tests (avx512_emulation.h)
#include <immintrin.h>
#endif
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#define LANES 32   // bfloat16 values per 64-byte register

// K rounded up to whole 64-byte registers: the width of a prepared activation row.
static inline int64_t padded_width(int64_t K) {
    return (K + LANES - 1) / LANES * LANES;
}

static inline uint16_t float_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    bits += 0x7FFF + ((bits >> 16) & 1);  // round to nearest even, as torch's .to(torch.bfloat16)
    return (uint16_t)(bits >> 16);
}

// Each build below defines how a dot product of a weight row and an activation row sums (one order, whatever rows
// are computed together, so a prompt's numbers do not depend on its chunking or batching) and these:
//   prepared_t, prepare_rows(x, M, K, Kp, prepared): the M activation rows as the dot products read them, Kp
//     values a row (K padded to whole registers with zeros);
//   weight_rows(w, n0, prepared, K, Kp, M, N, y): columns n0 .. n0 + ROW_UNIT - 1 of y (M, N) (fewer at N), rounded
//     to bfloat16: one task;
//   ROW_UNIT: weight rows a task takes;
//   M_TILE: activation rows that share each loaded weight value, so blocks of rows are multiples of it;
//   ROW_BLOCK_BYTES: the prepared activation rows bf16_linear gives a pass over the weights.
#ifdef LLAMAFORGE_AVX2
// AVX2 (16 registers of 8 floats): each dot product is one 8-lane float32 chain. A step takes 16 bfloat16 values
// of the weight row (one 32-byte load): their odd-position products first, then the even ones (a bfloat16 is the
// high half of a float32, so odd values need only a mask and even ones a shift), each product exact in float32;
// a fixed reduction of the 8 lanes ends it. Since a sum has one register, any number of weight and activation rows
// can share a step (a tile) without changing any sum, and tiles are shaped for the registers: 3 x 4 for prompts
// (12 sums, 3 weights, 1 activation; dense_steps_3x4), 8 x 1 for one token (eight weight rows stream at once, where
// one stream a core left bandwidth unused). Activations are widened to float32 once per call, each step's odd values
// then its even ones, so they need no unpacking in the loop. Against AVX-512's order (four chains a sum, two 8-lane
// halves of two 16-lane ones, which left AVX2 room for only 2 x 4 tiles of one chain at a time), on Zen 3: one
// prompt layer 1.26-1.46x, a 128-token prefill 1.3x, a decode step 1.09x (docs/benchmarks.md).
typedef float prepared_t;
#define STEP 16        // bfloat16 values a step
#define M_TILE 4       // activation rows a tile of the many-row loop
#define ROW_UNIT 24    // weight rows a task: 8 tiles of 3 weight rows, or 6 of 4, or 3 of 8
#define K_BLOCK 1024   // values of a tile's activation rows a pass over the task's weight rows (they stay in L1)
#define ROW_BLOCK_BYTES (4 << 20)  // a task's weight rows stay in L2 while a prompt's rows pass (384 KB: 0.86-1x)

static void prepare_rows(const uint16_t *x, int64_t M, int64_t K, int64_t Kp, prepared_t *wide) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000);
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < Kp; k += STEP) {
            uint16_t buffer[STEP] = {0};  // zeros past the row's end
            if (k < K) memcpy(buffer, x + m * K + k, sizeof(uint16_t) * (size_t)(K - k < STEP ? K - k : STEP));
            const __m256i values = _mm256_loadu_si256((const __m256i *)buffer);
            _mm256_storeu_ps(wide + m * Kp + k, _mm256_castsi256_ps(_mm256_and_si256(values, high)));
            _mm256_storeu_ps(wide + m * Kp + k + 8, _mm256_castsi256_ps(_mm256_slli_epi32(values, 16)));
        }
}

// sums[r][a] += the steps in [begin, end) of weight row r (at w, rows `stride` apart, w + k being step k's values)
// dotted with activation row a (at wide, rows Kp apart). Both halves load the weights again: kept, they would not
// leave room for the sums.
static inline __attribute__((always_inline)) void dense_steps(const uint16_t *w, int64_t stride, const float *wide,
                                                              int64_t Kp, int64_t begin, int64_t end, const int rows,
                                                              const int acts, __m256 sums[8][M_TILE]) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000);
    for (int64_t k = begin; k < end; k += STEP) {
        __m256 values[8];
        for (int r = 0; r < rows; r++)
            values[r] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256((const __m256i *)(w + r * stride + k)),
                                                             high));
        for (int a = 0; a < acts; a++) {
            const __m256 odd = _mm256_loadu_ps(wide + a * Kp + k);
            for (int r = 0; r < rows; r++) sums[r][a] = _mm256_fmadd_ps(odd, values[r], sums[r][a]);
        }
        for (int r = 0; r < rows; r++)
            values[r] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(w + r * stride + k)),
                                                              16));
        for (int a = 0; a < acts; a++) {
            const __m256 even = _mm256_loadu_ps(wide + a * Kp + k + 8);
            for (int r = 0; r < rows; r++) sums[r][a] = _mm256_fmadd_ps(even, values[r], sums[r][a]);
        }
    }
}

// dense_steps for 3 weight rows and 4 activation rows, in assembly: 12 sums, 3 weights and an activation take all 16
// registers (the mask is read from memory), where gcc's allocation of the C loop spills. 1.01-1.09x the 3 x 3 tile's
// speed a layer on Zen 3 (each loaded weight feeds 4 multiply-adds instead of 3), the same sums.
static const uint32_t HIGH_HALVES[8] __attribute__((aligned(32))) = {
    0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u, 0xFFFF0000u};

// One activation row's 8 values at `address` (odd or even ones) times the 3 unpacked weights, into its 3 sums.
#define ACT_FMAS(address, a)                                        \
    "vmovups " address ", %%ymm15\n\t"                              \
    "vfmadd231ps %%ymm15, %%ymm12, %[s0" a "]\n\t"                  \
    "vfmadd231ps %%ymm15, %%ymm13, %[s1" a "]\n\t"                  \
    "vfmadd231ps %%ymm15, %%ymm14, %[s2" a "]\n\t"

static inline __attribute__((always_inline)) void dense_steps_3x4(const uint16_t *w, int64_t stride, const float *wide,
                                                                  int64_t Kp, int64_t begin, int64_t end,
                                                                  __m256 sums[8][M_TILE]) {
    __m256 s00 = sums[0][0], s01 = sums[0][1], s02 = sums[0][2], s03 = sums[0][3];
    __m256 s10 = sums[1][0], s11 = sums[1][1], s12 = sums[1][2], s13 = sums[1][3];
    __m256 s20 = sums[2][0], s21 = sums[2][1], s22 = sums[2][2], s23 = sums[2][3];
    const int64_t w_bytes = stride * 2, x_bytes = Kp * 4;
    for (int64_t k = begin; k < end; k += STEP) {
        const uint16_t *wk = w + k;
        const float *xk = wide + k, *x3 = wide + 3 * Kp + k;
        __asm__(
            "vmovdqu (%[w]), %%ymm12\n\t"           "vpand %[high], %%ymm12, %%ymm12\n\t"
            "vmovdqu (%[w],%[ws]), %%ymm13\n\t"     "vpand %[high], %%ymm13, %%ymm13\n\t"
            "vmovdqu (%[w],%[ws],2), %%ymm14\n\t"   "vpand %[high], %%ymm14, %%ymm14\n\t"
            ACT_FMAS("(%[x])", "0") ACT_FMAS("(%[x],%[xs])", "1") ACT_FMAS("(%[x],%[xs],2)", "2")
            ACT_FMAS("(%[x3])", "3")
            "vmovdqu (%[w]), %%ymm12\n\t"           "vpslld $16, %%ymm12, %%ymm12\n\t"
            "vmovdqu (%[w],%[ws]), %%ymm13\n\t"     "vpslld $16, %%ymm13, %%ymm13\n\t"
            "vmovdqu (%[w],%[ws],2), %%ymm14\n\t"   "vpslld $16, %%ymm14, %%ymm14\n\t"
            ACT_FMAS("32(%[x])", "0") ACT_FMAS("32(%[x],%[xs])", "1") ACT_FMAS("32(%[x],%[xs],2)", "2")
            ACT_FMAS("32(%[x3])", "3")
            : [s00] "+x"(s00), [s01] "+x"(s01), [s02] "+x"(s02), [s03] "+x"(s03),
              [s10] "+x"(s10), [s11] "+x"(s11), [s12] "+x"(s12), [s13] "+x"(s13),
              [s20] "+x"(s20), [s21] "+x"(s21), [s22] "+x"(s22), [s23] "+x"(s23)
            : [w] "r"(wk), [ws] "r"(w_bytes), [x] "r"(xk), [xs] "r"(x_bytes), [x3] "r"(x3),
              [high] "m"(*(const __m256i *)HIGH_HALVES)
            : "xmm12", "xmm13", "xmm14", "xmm15", "memory");
    }
    sums[0][0] = s00; sums[0][1] = s01; sums[0][2] = s02; sums[0][3] = s03;
    sums[1][0] = s10; sums[1][1] = s11; sums[1][2] = s12; sums[1][3] = s13;
    sums[2][0] = s20; sums[2][1] = s21; sums[2][2] = s22; sums[2][3] = s23;
}
#undef ACT_FMAS

// dense_steps over [begin, end) for weight rows n .. n + rows - 1 into sums[0 .. rows - 1], the step holding a row's
// last values (K not a multiple of STEP) from a copy padded with zeros, so nothing past a row is read.
static inline __attribute__((always_inline)) void dense_tile(const uint16_t *w, int64_t n, int64_t K,
                                                             const float *wide, int64_t Kp, int64_t begin, int64_t end,
                                                             const int rows, const int acts,
                                                             __m256 sums[ROW_UNIT][M_TILE]) {
    __m256 tile[8][M_TILE];
    for (int r = 0; r < rows; r++)
        for (int a = 0; a < acts; a++) tile[r][a] = sums[r][a];
    const int64_t whole = K / STEP * STEP, stop = end < whole ? end : whole;
    if (rows == 3 && acts == 4)
        dense_steps_3x4(w + n * K, K, wide, Kp, begin, stop, tile);
    else
        dense_steps(w + n * K, K, wide, Kp, begin, stop, rows, acts, tile);
    if (end > whole) {
        uint16_t last[8][STEP] = {{0}};
        for (int r = 0; r < rows; r++) memcpy(last[r], w + (n + r) * K + whole, sizeof(uint16_t) * (size_t)(K - whole));
        dense_steps(&last[0][0], STEP, wide + whole, Kp, 0, STEP, rows, acts, tile);
    }
    for (int r = 0; r < rows; r++)
        for (int a = 0; a < acts; a++) sums[r][a] = tile[r][a];
}

// The 8 lanes' sum, in one order: halves, then quarters, then the last pair.
static inline float lane_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static void weight_rows(const uint16_t *w, int64_t n0, const prepared_t *wide, int64_t K, int64_t Kp, int64_t M,
                        int64_t N, uint16_t *y) {
    const int64_t n1 = N - n0 < ROW_UNIT ? N : n0 + ROW_UNIT;
    const int64_t steps_end = (K + STEP - 1) / STEP * STEP;
    for (int64_t m0 = 0; m0 < M; m0 += M_TILE) {
        const int acts = M - m0 < M_TILE ? (int)(M - m0) : M_TILE;
        const int64_t tile_rows = acts == 1 ? 8 : acts == 2 ? 4 : 3;  // sums, weights and an activation fit
        const float *x = wide + m0 * Kp;
        __m256 sums[ROW_UNIT][M_TILE];
        for (int64_t n = n0; n < n1; n++)
            for (int a = 0; a < acts; a++) sums[n - n0][a] = _mm256_setzero_ps();
        const int64_t k_block = M > M_TILE ? K_BLOCK : steps_end;  // one tile's rows stay in L1 anyway
        for (int64_t begin = 0; begin < steps_end; begin += k_block) {
            const int64_t end = steps_end - begin < k_block ? steps_end : begin + k_block;
            for (int64_t n = n0; n < n1;) {
                // Constant tile shapes, so the sums live in registers; a task's last rows go one at a time.
                const int whole = n + tile_rows <= n1;
                switch (whole ? acts : acts + M_TILE) {
                    case 1: dense_tile(w, n, K, x, Kp, begin, end, 8, 1, sums + (n - n0)); break;
                    case 2: dense_tile(w, n, K, x, Kp, begin, end, 4, 2, sums + (n - n0)); break;
                    case 3: dense_tile(w, n, K, x, Kp, begin, end, 3, 3, sums + (n - n0)); break;
                    case 4: dense_tile(w, n, K, x, Kp, begin, end, 3, 4, sums + (n - n0)); break;
                    case 1 + M_TILE: dense_tile(w, n, K, x, Kp, begin, end, 1, 1, sums + (n - n0)); break;
                    case 2 + M_TILE: dense_tile(w, n, K, x, Kp, begin, end, 1, 2, sums + (n - n0)); break;
                    case 3 + M_TILE: dense_tile(w, n, K, x, Kp, begin, end, 1, 3, sums + (n - n0)); break;
                    default: dense_tile(w, n, K, x, Kp, begin, end, 1, 4, sums + (n - n0)); break;
                }
                n += whole ? tile_rows : 1;
            }
        }
        for (int64_t n = n0; n < n1; n++)
            for (int a = 0; a < acts; a++) y[(m0 + a) * N + n] = float_to_bf16(lane_sum(sums[n - n0][a]));
    }
}
#else
// AVX-512 BF16: VDPBF16PS multiplies 32 bfloat16 pairs and adds them into 16 lanes; each sum runs in two
// accumulators over alternate 32-value chunks, a masked tail into the first, then one reduction.
typedef uint16_t prepared_t;
#define M_TILE 4          // activation rows that share each loaded weight chunk
#define QUAD 4            // weight rows of the many-row path (quad_dot)
#define ROW_UNIT QUAD
#define QUAD_MIN_ROWS 4   // more activation rows than this take quad_dot
#define ROW_BLOCK_BYTES (384 * 1024)  // a block's activation rows stay in a core's L2 (1 MB on Zen 4)

static void prepare_rows(const uint16_t *x, int64_t M, int64_t K, int64_t Kp, prepared_t *padded) {
    for (int64_t m = 0; m < M; m++) {
        memcpy(padded + m * Kp, x + m * K, sizeof(uint16_t) * (size_t)K);
        memset(padded + m * Kp + K, 0, sizeof(uint16_t) * (size_t)(Kp - K));
    }
}

// Dot products of one weight row (K values) with activation rows m0 .. m0 + tile - 1 (x padded to Kp with zeros)
// into out[t]. One weight row at a time streams fastest: two or four rows read side by side made a batch-1 product
// 1.4-2x slower (docs/benchmarks.md).
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

// Columns n0 .. n0 + ROW_UNIT - 1 of y (M, N) (fewer at N): a four of weight rows with every tile of activation rows
// (quad_dot) where there are more than QUAD_MIN_ROWS of them, else one weight row at a time (row_dot); every output
// the same bits either way.
static void weight_rows(const uint16_t *w, int64_t n0, const prepared_t *padded, int64_t K, int64_t Kp, int64_t M,
                        int64_t N, uint16_t *y) {
    const int64_t n1 = N - n0 < ROW_UNIT ? N : n0 + ROW_UNIT;
    int64_t n = n0;
    for (; M > QUAD_MIN_ROWS && n + QUAD <= n1; n += QUAD)
        for (int64_t m0 = 0; m0 < M; m0 += M_TILE) {
            float out[QUAD][M_TILE];
            const int tile = M - m0 < M_TILE ? (int)(M - m0) : M_TILE;
            switch (tile) {
                case 1: quad_dot(w, n, padded, K, Kp, m0, 1, out); break;
                case 2: quad_dot(w, n, padded, K, Kp, m0, 2, out); break;
                case 3: quad_dot(w, n, padded, K, Kp, m0, 3, out); break;
                default: quad_dot(w, n, padded, K, Kp, m0, 4, out); break;
            }
            for (int j = 0; j < QUAD; j++)
                for (int t = 0; t < tile; t++) y[(m0 + t) * N + n + j] = float_to_bf16(out[j][t]);
        }
    for (; n < n1; n++) weight_row(w + n * K, padded, K, Kp, M, N, n, y);
}
#endif

// y (M, N) = x (M, K) @ W.T, all bfloat16 (raw uint16 bits). Returns 0, or -1 when out of memory. Rows of x go in
// blocks of about ROW_BLOCK_BYTES prepared, each a pass over the weights; the threads share the weight rows,
// ROW_UNIT at a time.
int bf16_linear(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K, int n_threads) {
    const int64_t Kp = padded_width(K);
    prepared_t *prepared = (prepared_t *)malloc(sizeof(prepared_t) * (size_t)(M * Kp));
    if (!prepared) return -1;
    prepare_rows(x, M, K, Kp, prepared);
    int64_t block = ROW_BLOCK_BYTES / ((int64_t)sizeof(prepared_t) * Kp) / M_TILE * M_TILE;
    if (block < M_TILE) block = M_TILE;
    const int64_t units = (N + ROW_UNIT - 1) / ROW_UNIT;
    for (int64_t b0 = 0; b0 < M; b0 += block) {
        const int64_t rows = M - b0 < block ? M - b0 : block;
        #pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int64_t u = 0; u < units; u++)
            weight_rows(w, u * ROW_UNIT, prepared + b0 * Kp, K, Kp, rows, N, y + b0 * N);
    }
    free(prepared);
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
// key-value head, into `weights` (room for L rounded up to 16 floats) as bfloat16 bits packed at its start
// (position l's at ((uint16_t *)weights)[l], zeros past the last visible one), as weighted_values reads them;
// `visible` is its row of the mask (NULL: all L positions). Returns how many positions the query reads: those past
// its last visible one would add only zeros (a causal query of a prompt's chunk skips the later tokens), so a
// query's numbers are the same whatever follows it. Position l's key is at keys + offsets[l].
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
    // Packed in place: positions l .. l + 15 go to bytes 2l .. 2l + 31, after their floats (bytes 4l .. 4l + 63) are
    // read and before any float not yet read (from byte 4l + 64 on).
    uint16_t *packed = (uint16_t *)weights;
    for (int64_t l = 0; l < Lp; l += 16)
        _mm256_storeu_si256((__m256i *)(packed + l),
                            to_bf16_bits(_mm512_mul_ps(_mm512_load_ps(weights + l), inverse)));
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
// bfloat16 weights packed at `weights + i * Lp` (attention_weights), its output at `outs[i]`. Two positions at a
// time: their values interleaved into bfloat16 pairs once, then times each query's pair of weights, by VDPBF16PS;
// exact products, float32 sums. A query skips the pairs where both its weights are 0, and its last pair's second
// value is 0 when its length is odd: each query's sums are those it would get alone. Position l's value is at
// values + offsets[l].
static inline __attribute__((always_inline)) void weighted_values(const int chunks, const int queries, int count,
                                                                  const float *weights, int64_t Lp,
                                                                  const int64_t *lengths, const uint16_t *values,
                                                                  const int64_t *offsets, uint16_t *const *outs) {
    __m512 acc[16];
    for (int a = 0; a < queries * chunks; a++) acc[a] = _mm512_setzero_ps();
    int64_t longest = 0;
    for (int i = 0; i < count; i++) longest = lengths[i] > longest ? lengths[i] : longest;
    for (int64_t l = 0; l < longest; l += 2) {
        // Query i's weights of positions l (low half) and l + 1: when l + 1 is its length (odd), that weight is one of
        // the zeros attention_weights packs up to a multiple of 16 positions.
        uint32_t both[GROUP_QUERIES];
        int uses = 0;  // bit i: query i has a nonzero weight in this pair (weights are never -0)
        for (int i = 0; i < queries; i++) {
            both[i] = 0;
            if (i < count && l < lengths[i]) memcpy(&both[i], (const uint16_t *)(weights + i * Lp) + l, 4);
            uses |= (both[i] != 0) << i;
        }
        if (!uses) continue;
        const uint16_t *first = values + offsets[l], *second = l + 1 < longest ? values + offsets[l + 1] : first;
        __m512i pairs[16];
        for (int d = 0; d < chunks; d++) {
            const __m512i low = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(first + d * 16)));
            if (l + 1 >= longest) {
                pairs[d] = low;
                continue;
            }
            const __m512i high = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(second + d * 16)));
            pairs[d] = _mm512_or_si512(low, _mm512_slli_epi32(high, 16));
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
