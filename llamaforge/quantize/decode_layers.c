// A whole decode step's decoder layers in one call, for a batch of sequences of a bfloat16 model (linear layers in
// bfloat16 or int8 / int4), one new token each (llamaforge/model.py's DecoderLayer): the CPU decode path.
//
// Run layer by layer through torch, a step costs ~60 operator calls a layer besides the matrix products, each with
// its dispatch and, for the parallel ones, an OpenMP fork and join: on a 22-layer model about a third of the step
// (docs/benchmarks.md). Here the threads enter one parallel region for all layers; the products split their weight
// tiles between the threads (qlinear.c's loop), attention splits its heads (bf16linear.c's), and the small
// vector work between them (norms, RoPE, SwiGLU, residuals) runs on one thread while the others wait at the
// barrier that follows.
//
// It rounds where model.py's bfloat16 operators do: the norm's float result to bfloat16 before the weight
// multiplies it, each RoPE product and their sum, SiLU's output and its product with `up`, each residual sum; the
// matrix products and attention are the kernels that path calls. Reductions (the norm's mean of squares) add in
// another order than torch's, so a value can land one bfloat16 step away from torch's now and then.
//
// Built by llamaforge/quantize/kernels.py with the flags of both kernels it includes (AVX-512 VNNI and BF16).

#include "qlinear.c"
#include "bf16linear.c"

// The weights that multiply one input (q, k, v; or gate, up; or one alone), each of its own scheme (a GGUF file's q
// and k may be Q4_K and v Q6_K): int8 / int4 / a k-quant (`kind`, one of qlinear.c's KIND_*) in qlinear.c's
// layout, or (bits 16) bfloat16 rows (N, K) in `dense`; and where LoRA adapters are served (llamaforge/adapters.py), each
// projection's stacked low-rank matrices, float32: A (slots, rank, K) and B (slots, rank, N) (else NULL).
typedef struct {
    const uint8_t *codes[3];
    const uint16_t *scales[3];
    const uint16_t *dense[3];
    int64_t N[3];
    int64_t count, bits[3], group[3], kind[3];
    const float *lora_a[3], *lora_b[3];
    int64_t lora_rank;
} Projections;

typedef struct {
    Projections qkv, o, gate_up, down;
    const uint16_t *input_norm, *post_attention_norm;  // (dim) bfloat16
    uint16_t *k_cache, *v_cache;  // this layer's keys and values, addressed as decode_layers says
} Layer;

typedef struct {
    int64_t dim, hidden, H, Hkv, D, kv_stride_h;
    float eps;
} Dims;

// out = weight * bfloat16(x * rsqrt(mean(x^2) + eps)), as RMSNorm in a bfloat16 model.
static void rms_norm(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t n, float eps) {
    __m512 squares = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {  // squares rounded, then added: torch's pow, then mean
        const __m512 v = load16_as_float(x, 1, i, first_lanes(n - i));
        squares = _mm512_add_ps(squares, _mm512_mul_ps(v, v));
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)n + eps));
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 keep = first_lanes(n - i);
        __m512 normed = round16_to_bf16(_mm512_mul_ps(load16_as_float(x, 1, i, keep), inverse));
        store16(out, 1, i, _mm512_mul_ps(load16_as_float(weight, 1, i, keep), normed), keep);
    }
}

// Rotate-half RoPE of `heads` vectors of D values in place: x * cos + rotate_half(x) * sin, each product rounded.
static void rope(uint16_t *x, int64_t heads, int64_t D, const uint16_t *cos, const uint16_t *sin) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < heads; h++) {
        uint16_t *v = x + h * D;
        for (int64_t i = 0; i < half; i++) {
            const float a = bf16_value(v[i]), b = bf16_value(v[i + half]);
            const float low = bf16_value(float_to_bf16(bf16_value(float_to_bf16(a * bf16_value(cos[i])))
                                                       + bf16_value(float_to_bf16(-b * bf16_value(sin[i])))));
            const float high = bf16_value(float_to_bf16(bf16_value(float_to_bf16(b * bf16_value(cos[i + half])))
                                                        + bf16_value(float_to_bf16(a * bf16_value(sin[i + half])))));
            v[i] = float_to_bf16(low);
            v[i + half] = float_to_bf16(high);
        }
    }
}

// x += y, rounded to bfloat16.
static void add_residual(uint16_t *x, const uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 keep = first_lanes(n - i);
        store16(x, 1, i, _mm512_add_ps(load16_as_float(x, 1, i, keep), load16_as_float(y, 1, i, keep)), keep);
    }
}

// out = bfloat16(silu(gate)) * up, rounded, as SwiGLU in a bfloat16 model.
static void swiglu(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 keep = first_lanes(n - i);
        const __m512 g = load16_as_float(gate, 1, i, keep);
        const __m512 silu = round16_to_bf16(_mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(
                                                              _mm512_setzero_ps(), g)))));
        store16(out, 1, i, _mm512_mul_ps(silu, load16_as_float(up, 1, i, keep)), keep);
    }
}

// RMSNorm of `rows` rows of n values (the layer-by-layer path's, so that it rounds exactly as decode_layers).
void rms_norm_rows(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t rows, int64_t n, float eps,
                   int n_threads) {
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (rows > 1)
    for (int64_t row = 0; row < rows; row++) rms_norm(x + row * n, weight, out + row * n, n, eps);
}

// SwiGLU's bfloat16(silu(gate)) * up of n values (the layer-by-layer path's, rounding exactly as decode_layers).
void swiglu_rows(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t n, int n_threads) {
    const int64_t chunk = 4096;  // values per task: small inputs stay on one thread
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (n > chunk)
    for (int64_t start = 0; start < n; start += chunk)
        swiglu(gate + start, up + start, out + start, n - start < chunk ? n - start : chunk);
}

// The M rows of x times bfloat16 weights: x prepared for the dot products (one thread), then the weights' rows shared
// out ROW_UNIT at a time (all threads), as bf16linear.c's bf16_linear computes them.
static void project_dense(const Projections *p, const uint16_t *x, int64_t M, int64_t K, uint16_t *const *ys,
                          prepared_t *prepared) {
    const int64_t Kp = padded_width(K);
    int64_t first_unit[4] = {0};
    for (int i = 0; i < p->count; i++) first_unit[i + 1] = first_unit[i] + (p->N[i] + ROW_UNIT - 1) / ROW_UNIT;
    #pragma omp single
    prepare_rows(x, M, K, Kp, prepared);
    #pragma omp for schedule(static)
    for (int64_t joint = 0; joint < first_unit[p->count]; joint++) {
        const int i = joint_owner(joint, (int)p->count, first_unit);
        const int64_t n0 = (joint - first_unit[i]) * ROW_UNIT;
        weight_rows(p->dense[i], n0, prepared, K, Kp, M, p->N[i], ys[i]);
    }
}

// Projection i of p alone, as a set of one.
static Projections one_projection(const Projections *p, int i) {
    Projections one = *p;
    one.codes[0] = p->codes[i];
    one.scales[0] = p->scales[i];
    one.dense[0] = p->dense[i];
    one.N[0] = p->N[i];
    one.bits[0] = p->bits[i];
    one.group[0] = p->group[i];
    one.kind[0] = p->kind[i];
    one.count = 1;
    return one;
}

// Quantize the M rows of x for a set of projections (one thread), then multiply (all threads, tiles shared out);
// call from every thread of the region. `act` has room for M rows of the widest input, `prepared` for M rows of it
// prepared for bfloat16 weights (bf16linear.c's prepare_rows). Projections of different schemes go one at a time.
static void project(const Projections *p, const uint16_t *x, int64_t M, int64_t K, uint16_t *const *ys,
                    QuantizedActivations *act, prepared_t *prepared) {
    for (int i = 1; i < p->count; i++) {
        if (p->bits[i] != p->bits[0] || p->group[i] != p->group[0] || p->kind[i] != p->kind[0]) {
            for (int j = 0; j < p->count; j++) {
                const Projections one = one_projection(p, j);
                project(&one, x, M, K, ys + j, act, prepared);
            }
            return;
        }
    }
    if (p->bits[0] == 16) {
        project_dense(p, x, M, K, ys, prepared);
        return;
    }
    const Shape s = shape_of(K, (int)p->bits[0], p->group[0], (int)p->kind[0]);
    int64_t first_tile[4] = {0};
    for (int i = 0; i < p->count; i++) first_tile[i + 1] = first_tile[i] + (p->N[i] + TILE - 1) / TILE;
    #pragma omp single
    quantize_activations(x, 1, M, &s, p->bits[0] == 8 ? 128 : 8, act, 1);
    const int64_t tiles = first_tile[p->count];
    #pragma omp for schedule(static)
    for (int64_t first = 0; first < tiles; first += TASK_TILES)
        joint_task(first, tiles, (int)p->count, first_tile, p->codes, p->scales, (void *const *)ys, p->N, M, act,
                   &s, 1);
}

// One row's low-rank update of one projection added to its output, as adapters.MultiLoraLinear adds it:
// y = bfloat16(y + bfloat16(b.T @ (a @ x))) with a (rank, K) and b (rank, N) float32 (the adapter's scaling folded
// into b), x and y bfloat16, the sums float32 in a fixed order: a row's numbers are its own, in decode_layers and
// lora_rows alike. Four of a's rows share each load of x.
static void add_lora_row(const uint16_t *x, int64_t K, const float *a, const float *b, int64_t rank, int64_t N,
                         const uint16_t *y_in, uint16_t *y) {
    float low[rank];
    for (int64_t r0 = 0; r0 < rank; r0 += 4) {
        __m512 sums[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        const int rows = rank - r0 < 4 ? (int)(rank - r0) : 4;
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 keep = first_lanes(K - k);
            const __m512 values = load16_as_float(x, 1, k, keep);
            for (int r = 0; r < rows; r++)
                sums[r] = _mm512_fmadd_ps(values, _mm512_maskz_loadu_ps(keep, a + (r0 + r) * K + k), sums[r]);
        }
        for (int r = 0; r < rows; r++) low[r0 + r] = _mm512_reduce_add_ps(sums[r]);
    }
    for (int64_t n = 0; n < N; n += 16) {
        const __mmask16 keep = first_lanes(N - n);
        __m512 update = _mm512_setzero_ps();
        for (int64_t r = 0; r < rank; r++)
            update = _mm512_fmadd_ps(_mm512_set1_ps(low[r]), _mm512_maskz_loadu_ps(keep, b + r * N + n), update);
        store16(y, 1, n, _mm512_add_ps(load16_as_float(y_in, 1, n, keep), round16_to_bf16(update)), keep);
    }
}

// The LoRA updates of a set of projections for the `adapted` rows of x (B, K) (row indices, grouped by slot so
// that each adapter's matrices stay in cache), slots[b] being row b's adapter; call from every thread of the region.
static void add_lora(const Projections *p, const uint16_t *x, int64_t K, uint16_t *const *ys, const int64_t *slots,
                     const int64_t *adapted, int64_t n_adapted) {
    if (n_adapted == 0 || p->lora_a[0] == NULL) return;
    const int64_t rank = p->lora_rank;
    #pragma omp for schedule(static)
    for (int64_t item = 0; item < p->count * n_adapted; item++) {  // (projection, adapted row) pairs
        const int i = (int)(item / n_adapted);
        const int64_t b = adapted[item % n_adapted], N = p->N[i], slot = slots[b];
        add_lora_row(x + b * K, K, p->lora_a[i] + slot * rank * K, p->lora_b[i] + slot * rank * N, rank, N,
                     ys[i] + b * N, ys[i] + b * N);
    }
}

// y (B * T, N) = x's rows' LoRA updates added to y_in, all bfloat16, row m of x being a token of sequence m / T,
// whose adapter is slots[m / T] (0: none, y_in's row copied); a (slots, rank, K), b (slots, rank, N) as in
// Projections. The layer-by-layer path's, so that it rounds exactly as decode_layers.
void lora_rows(const uint16_t *x, const uint16_t *y_in, uint16_t *y, int64_t B, int64_t T, int64_t K, int64_t N,
               const float *a, const float *b, int64_t rank, const int64_t *slots, int n_threads) {
    #pragma omp parallel for num_threads(n_threads) schedule(static) if (B * T > 1)
    for (int64_t m = 0; m < B * T; m++) {
        const int64_t slot = slots[m / T];
        if (slot == 0)
            memcpy(y + m * N, y_in + m * N, sizeof(uint16_t) * (size_t)N);
        else
            add_lora_row(x + m * K, K, a + slot * rank * K, b + slot * rank * N, rank, N, y_in + m * N, y + m * N);
    }
}

// Run `n_layers` decoder layers on the hidden states x (B, dim) bfloat16, in place, for one new token of each of
// B sequences: row b's token sits at positions[b], where each layer writes its key and value, and attends over that
// row's positions 0 .. positions[b]. Row b's position l of key-value head h is at element offsets[b * offsets_stride
// + l] + h * kv_stride_h of each layer's k_cache and v_cache (rows of a contiguous cache, or the blocks of a paged
// one), offsets_stride > every position. cos and sin (B, D) are the
// rows' RoPE tables in bfloat16. slots (B) are the rows' LoRA adapters where the layers serve them (0: none; NULL:
// no row has one). Every row's arithmetic is its own, whatever else is in the batch. Returns 0, or -1 when out of
// memory.
int decode_layers(uint16_t *x, int64_t B, const Layer *layers, int64_t n_layers, const Dims *d,
                  const uint16_t *cos, const uint16_t *sin, const int64_t *positions, const int64_t *offsets,
                  int64_t offsets_stride, const int64_t *slots, int n_threads) {
    const int64_t dim = d->dim, hidden = d->hidden, H = d->H, D = d->D, HD = H * D, KVD = d->Hkv * D;
    const int64_t wider = dim > hidden ? dim : hidden, widest = wider > HD ? wider : HD;
    int64_t Lp = 16;  // room for the scores of the longest row's attention
    for (int64_t b = 0; b < B; b++) Lp = positions[b] + 1 > Lp ? (positions[b] + 16) / 16 * 16 : Lp;
    uint16_t *buffer = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(B * (3 * dim + 2 * HD + 2 * KVD + 3 * hidden)));
    const int64_t groups = attention_groups(1, H, d->Hkv, 1, D), room = group_queries(D) * Lp;  // a row's
    float *weights = (float *)aligned_alloc(64, sizeof(float) * (size_t)(B * groups * room));
    QuantizedActivations act;  // room for the widest input a projection quantizes
    const int act_status = allocate_activations(&act, B, widest);
    prepared_t *prepared = (prepared_t *)malloc(sizeof(prepared_t) * (size_t)(B * padded_width(widest)));
    int64_t *adapted = (int64_t *)malloc(sizeof(int64_t) * (size_t)B), n_adapted = 0;
    if (!buffer || !weights || act_status != 0 || !prepared || !adapted || D > 256 || D % 16 != 0) {
        free(buffer); free(weights); free_activations(&act); free(prepared); free(adapted);
        return -1;
    }
    int64_t max_slot = 0;
    for (int64_t b = 0; slots && b < B; b++) max_slot = slots[b] > max_slot ? slots[b] : max_slot;
    for (int64_t slot = 1; slot <= max_slot; slot++)  // adapted rows, grouped by adapter
        for (int64_t b = 0; b < B; b++)
            if (slots[b] == slot) adapted[n_adapted++] = b;
    uint16_t *normed = buffer, *attn_out = normed + B * dim, *mlp_out = attn_out + B * dim, *q = mlp_out + B * dim;
    uint16_t *attended = q + B * HD, *k = attended + B * HD, *v = k + B * KVD, *gate = v + B * KVD;
    uint16_t *up = gate + B * hidden, *gated = up + B * hidden;
    #pragma omp parallel num_threads(n_threads)
    for (int64_t l = 0; l < n_layers; l++) {
        const Layer *w = layers + l;
        #pragma omp single
        for (int64_t b = 0; b < B; b++) rms_norm(x + b * dim, w->input_norm, normed + b * dim, dim, d->eps);
        uint16_t *qkv[3] = {q, k, v};
        project(&w->qkv, normed, B, dim, qkv, &act, prepared);
        add_lora(&w->qkv, normed, dim, qkv, slots, adapted, n_adapted);
        #pragma omp single
        for (int64_t b = 0; b < B; b++) {
            rope(q + b * HD, H, D, cos + b * D, sin + b * D);
            rope(k + b * KVD, d->Hkv, D, cos + b * D, sin + b * D);
            for (int64_t h = 0; h < d->Hkv; h++) {
                const int64_t at = offsets[b * offsets_stride + positions[b]] + h * d->kv_stride_h;
                memcpy(w->k_cache + at, k + b * KVD + h * D, sizeof(uint16_t) * (size_t)D);
                memcpy(w->v_cache + at, v + b * KVD + h * D, sizeof(uint16_t) * (size_t)D);
            }
        }
        #pragma omp for schedule(static)
        for (int64_t group = 0; group < B * groups; group++)  // each row's heads, a few at a time
            attend_group(group, q, w->k_cache, w->v_cache, NULL, attended, H, d->Hkv, 1, D,
                         positions[group / groups] + 1, offsets, offsets_stride, d->kv_stride_h,
                         weights + group * room);
        project(&w->o, attended, B, HD, &attn_out, &act, prepared);
        add_lora(&w->o, attended, HD, &attn_out, slots, adapted, n_adapted);
        #pragma omp single
        for (int64_t b = 0; b < B; b++) {
            add_residual(x + b * dim, attn_out + b * dim, dim);
            rms_norm(x + b * dim, w->post_attention_norm, normed + b * dim, dim, d->eps);
        }
        uint16_t *gate_up[2] = {gate, up};
        project(&w->gate_up, normed, B, dim, gate_up, &act, prepared);
        add_lora(&w->gate_up, normed, dim, gate_up, slots, adapted, n_adapted);
        #pragma omp single
        swiglu(gate, up, gated, B * hidden);
        project(&w->down, gated, B, hidden, &mlp_out, &act, prepared);
        add_lora(&w->down, gated, hidden, &mlp_out, slots, adapted, n_adapted);
        #pragma omp single
        add_residual(x, mlp_out, B * dim);
    }
    free(buffer); free(weights); free_activations(&act); free(prepared); free(adapted);
    return 0;
}
