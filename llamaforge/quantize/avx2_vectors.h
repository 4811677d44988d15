// The kernels' 512-bit vector operations on CPUs with AVX2 (and FMA, F16C) but no AVX-512: kernels.py builds the C
// sources with this header forced in (-include, with -DLLAMAFORGE_AVX2), so one source serves both instruction sets.
// A 512-bit vector is a pair of 256-bit registers (a struct, which gcc keeps in registers; its 64-byte vector types
// go through memory without AVX-512), and each operation the kernels use is written as its pair of AVX2 operations.
// Masks stay integers (one bit a lane), turned into lane masks where an operation needs them.
//
// Only what the kernels use is here, and only as they use it: where an operation's full range would cost more
// (a scale by 2^n, a narrowing conversion), the comment says the range it covers. The hot inner loops that AVX2 has
// no instruction for (VPDPBUSD's byte dot products) are written for AVX2 in the kernels themselves, under
// LLAMAFORGE_AVX2; an operation missing here is a compile error, never a silent slow path.
#ifndef LLAMAFORGE_AVX2_VECTORS_H
#define LLAMAFORGE_AVX2_VECTORS_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef struct { __m256 h[2]; } llf_v16f;   // 16 float32 lanes: h[0] lanes 0-7, h[1] lanes 8-15
typedef struct { __m256i h[2]; } llf_v16i;  // 64 bytes of integers (also bfloat16 pairs)

#define LLF_INLINE static inline __attribute__((always_inline))

// The vector type names the kernels use, after immintrin.h has declared its own.
#define __m512 llf_v16f
#define __m512i llf_v16i
#define __m512bh llf_v16i

// Lane-wise: r.h[i] = op(a.h[i], ...), for both halves.
#define LLF_EACH(type, expression) \
    type r_;                       \
    for (int i = 0; i < 2; i++) r_.h[i] = (expression); \
    return r_

// The lanes of 8 bits of `bits` as all-ones / zero 32-bit lanes.
LLF_INLINE __m256i llf_lanes8(unsigned bits) {
    const __m256i select = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), select), select);
}

LLF_INLINE __m512 llf_set1_ps(float v) { LLF_EACH(__m512, _mm256_set1_ps(v)); }
LLF_INLINE __m512 llf_setzero_ps(void) { LLF_EACH(__m512, _mm256_setzero_ps()); }
LLF_INLINE __m512i llf_setzero_si512(void) { LLF_EACH(__m512i, _mm256_setzero_si256()); }
LLF_INLINE __m512i llf_set1_epi32(int v) { LLF_EACH(__m512i, _mm256_set1_epi32(v)); }
LLF_INLINE __m512i llf_set1_epi8(char v) { LLF_EACH(__m512i, _mm256_set1_epi8(v)); }
LLF_INLINE __m512i llf_loadu_si512(const void *p) {
    LLF_EACH(__m512i, _mm256_loadu_si256((const __m256i *)((const char *)p + 32 * i)));
}
LLF_INLINE __m512 llf_load_ps(const float *p) { LLF_EACH(__m512, _mm256_load_ps(p + 8 * i)); }
LLF_INLINE void llf_store_ps(float *p, __m512 a) {
    _mm256_store_ps(p, a.h[0]);
    _mm256_store_ps(p + 8, a.h[1]);
}
LLF_INLINE __m512 llf_add_ps(__m512 a, __m512 b) { LLF_EACH(__m512, _mm256_add_ps(a.h[i], b.h[i])); }
LLF_INLINE __m512 llf_sub_ps(__m512 a, __m512 b) { LLF_EACH(__m512, _mm256_sub_ps(a.h[i], b.h[i])); }
LLF_INLINE __m512 llf_mul_ps(__m512 a, __m512 b) { LLF_EACH(__m512, _mm256_mul_ps(a.h[i], b.h[i])); }
LLF_INLINE __m512 llf_div_ps(__m512 a, __m512 b) { LLF_EACH(__m512, _mm256_div_ps(a.h[i], b.h[i])); }
LLF_INLINE __m512 llf_max_ps(__m512 a, __m512 b) { LLF_EACH(__m512, _mm256_max_ps(a.h[i], b.h[i])); }
LLF_INLINE __m512 llf_min_ps(__m512 a, __m512 b) { LLF_EACH(__m512, _mm256_min_ps(a.h[i], b.h[i])); }
LLF_INLINE __m512 llf_fmadd_ps(__m512 a, __m512 b, __m512 c) {
    LLF_EACH(__m512, _mm256_fmadd_ps(a.h[i], b.h[i], c.h[i]));
}
LLF_INLINE __m512 llf_fnmadd_ps(__m512 a, __m512 b, __m512 c) {
    LLF_EACH(__m512, _mm256_fnmadd_ps(a.h[i], b.h[i], c.h[i]));
}
LLF_INLINE __m512 llf_abs_ps(__m512 a) {
    LLF_EACH(__m512, _mm256_and_ps(a.h[i], _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))));
}
LLF_INLINE __m512i llf_add_epi32(__m512i a, __m512i b) { LLF_EACH(__m512i, _mm256_add_epi32(a.h[i], b.h[i])); }
LLF_INLINE __m512i llf_sub_epi32(__m512i a, __m512i b) { LLF_EACH(__m512i, _mm256_sub_epi32(a.h[i], b.h[i])); }
LLF_INLINE __m512i llf_and_si512(__m512i a, __m512i b) { LLF_EACH(__m512i, _mm256_and_si256(a.h[i], b.h[i])); }
LLF_INLINE __m512i llf_or_si512(__m512i a, __m512i b) { LLF_EACH(__m512i, _mm256_or_si256(a.h[i], b.h[i])); }
LLF_INLINE __m512i llf_srli_epi32(__m512i a, const int n) { LLF_EACH(__m512i, _mm256_srli_epi32(a.h[i], n)); }
LLF_INLINE __m512i llf_slli_epi32(__m512i a, const int n) { LLF_EACH(__m512i, _mm256_slli_epi32(a.h[i], n)); }
LLF_INLINE __m512i llf_srli_epi16(__m512i a, const int n) { LLF_EACH(__m512i, _mm256_srli_epi16(a.h[i], n)); }
LLF_INLINE __m512 llf_castsi512_ps(__m512i a) { LLF_EACH(__m512, _mm256_castsi256_ps(a.h[i])); }
LLF_INLINE __m512i llf_castps_si512(__m512 a) { LLF_EACH(__m512i, _mm256_castps_si256(a.h[i])); }
LLF_INLINE __m512 llf_cvtepi32_ps(__m512i a) { LLF_EACH(__m512, _mm256_cvtepi32_ps(a.h[i])); }
LLF_INLINE __m512i llf_cvtps_epi32(__m512 a) { LLF_EACH(__m512i, _mm256_cvtps_epi32(a.h[i])); }
LLF_INLINE __m512 llf_roundscale_ps(__m512 a, const int mode) { LLF_EACH(__m512, _mm256_round_ps(a.h[i], mode)); }

// a * 2^n for integral n from -126 to 127 (exp16's range), where 2^n is a normal float built from its exponent bits.
LLF_INLINE __m512 llf_scalef_ps(__m512 a, __m512 n) {
    LLF_EACH(__m512, _mm256_mul_ps(a.h[i], _mm256_castsi256_ps(_mm256_slli_epi32(
                                               _mm256_add_epi32(_mm256_cvtps_epi32(n.h[i]), _mm256_set1_epi32(127)),
                                               23))));
}

// Widening conversions: the low and high 128 bits of the source each fill one half.
LLF_INLINE __m512i llf_cvtepu16_epi32(__m256i a) {
    LLF_EACH(__m512i, _mm256_cvtepu16_epi32(i ? _mm256_extracti128_si256(a, 1) : _mm256_castsi256_si128(a)));
}
LLF_INLINE __m512i llf_cvtepu8_epi32(__m128i a) {
    LLF_EACH(__m512i, _mm256_cvtepu8_epi32(i ? _mm_srli_si128(a, 8) : a));
}
LLF_INLINE __m512i llf_cvtepi8_epi32(__m128i a) {
    LLF_EACH(__m512i, _mm256_cvtepi8_epi32(i ? _mm_srli_si128(a, 8) : a));
}
LLF_INLINE __m512 llf_cvtph_ps(__m256i a) {
    LLF_EACH(__m512, _mm256_cvtph_ps(i ? _mm256_extracti128_si256(a, 1) : _mm256_castsi256_si128(a)));
}

// Narrowing conversions that truncate, as VPMOVDW / VPMOVDB do: each lane's low bits masked, then packed (whose
// saturation then changes nothing) and the 128-bit lanes put back in order.
LLF_INLINE __m256i llf_cvtepi32_epi16(__m512i a) {
    const __m256i low = _mm256_set1_epi32(0xFFFF);
    const __m256i packed = _mm256_packus_epi32(_mm256_and_si256(a.h[0], low), _mm256_and_si256(a.h[1], low));
    return _mm256_permute4x64_epi64(packed, 0xD8);
}
LLF_INLINE __m128i llf_cvtepi32_epi8(__m512i a) {
    const __m256i low = _mm256_set1_epi32(0xFF);
    const __m256i words = _mm256_permute4x64_epi64(
        _mm256_packus_epi32(_mm256_and_si256(a.h[0], low), _mm256_and_si256(a.h[1], low)), 0xD8);
    return _mm_packus_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
}

// Reductions, in gcc's order for AVX-512 (halves, then quarters, then pairs).
LLF_INLINE float llf_reduce_add_ps(__m512 a) {
    const __m256 eight = _mm256_add_ps(a.h[0], a.h[1]);
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
    const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));  // (0 + 2, 1 + 3)
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}
LLF_INLINE float llf_reduce_max_ps(__m512 a) {
    const __m256 eight = _mm256_max_ps(a.h[0], a.h[1]);
    const __m128 four = _mm_max_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
    const __m128 two = _mm_max_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_max_ss(two, _mm_movehdup_ps(two)));
}
LLF_INLINE int32_t llf_reduce_add_epi32(__m512i a) {
    const __m256i eight = _mm256_add_epi32(a.h[0], a.h[1]);
    const __m128i four = _mm_add_epi32(_mm256_castsi256_si128(eight), _mm256_extracti128_si256(eight, 1));
    const __m128i two = _mm_add_epi32(four, _mm_unpackhi_epi64(four, four));
    return _mm_cvtsi128_si32(_mm_add_epi32(two, _mm_shuffle_epi32(two, 1)));
}

// VPDPWSSD: each int32 lane plus the products of its two int16 pairs (VPMADDWD's sums, exact but for -32768 squared,
// which no caller passes).
LLF_INLINE __m512i llf_dpwssd_epi32(__m512i acc, __m512i a, __m512i b) {
    LLF_EACH(__m512i, _mm256_add_epi32(acc.h[i], _mm256_madd_epi16(a.h[i], b.h[i])));
}

// VDPBF16PS: each float lane plus the products of its two bfloat16 pairs, the odd pair's first (Intel's order).
// Products of bfloat16 values are exact in float32, so each fused multiply-add rounds once, as the instruction does.
LLF_INLINE __m512 llf_dpbf16_ps(__m512 acc, __m512bh a, __m512bh b) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000);
    LLF_EACH(__m512, _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a.h[i], 16)),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(b.h[i], 16)),
                                     _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(a.h[i], high)),
                                                     _mm256_castsi256_ps(_mm256_and_si256(b.h[i], high)), acc.h[i])));
}

// Compares and blends by lane mask.
#define llf_cmp_ps_mask(a, b, predicate)                                                                \
    ((__mmask16)(_mm256_movemask_ps(_mm256_cmp_ps((a).h[0], (b).h[0], predicate))                      \
                 | _mm256_movemask_ps(_mm256_cmp_ps((a).h[1], (b).h[1], predicate)) << 8))
LLF_INLINE __m512 llf_maskz_mov_ps(__mmask16 k, __m512 a) {
    LLF_EACH(__m512, _mm256_and_ps(a.h[i], _mm256_castsi256_ps(llf_lanes8(k >> (8 * i)))));
}
LLF_INLINE __m512 llf_mask_blend_ps(__mmask16 k, __m512 a, __m512 b) {
    LLF_EACH(__m512, _mm256_blendv_ps(a.h[i], b.h[i], _mm256_castsi256_ps(llf_lanes8(k >> (8 * i)))));
}
LLF_INLINE __mmask16 llf_mask_test_epi8_mask(__mmask16 k, __m128i a, __m128i b) {
    const int zero = _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_and_si128(a, b), _mm_setzero_si128()));
    return (__mmask16)(k & ~zero);
}

// Masked loads (zero where a bit is clear, nothing read there) and stores (memory untouched there). Float lanes use
// VMASKMOVPS; 8- and 16-bit lanes, which AVX2 cannot mask, go through a buffer unless every lane is kept.
LLF_INLINE __m512 llf_maskz_loadu_ps(__mmask16 k, const float *p) {
    __m512 r;
    for (int i = 0; i < 2; i++)
        r.h[i] = k == 0xFFFF ? _mm256_loadu_ps(p + 8 * i) : _mm256_maskload_ps(p + 8 * i, llf_lanes8(k >> (8 * i)));
    return r;
}
LLF_INLINE void llf_mask_storeu_ps(float *p, __mmask16 k, __m512 a) {
    for (int i = 0; i < 2; i++) _mm256_maskstore_ps(p + 8 * i, llf_lanes8(k >> (8 * i)), a.h[i]);
}
#define LLF_PARTIAL_LOAD(type, lanes, k, p, full_load)                 \
    if ((k) == (uint32_t)((1ull << (lanes)) - 1)) return full_load;       \
    type buffer_[lanes] = {0};                                          \
    for (int i = 0; i < lanes; i++)                                     \
        if ((k) >> i & 1) buffer_[i] = ((const type *)(p))[i];          \
    p = buffer_;                                                        \
    return full_load
LLF_INLINE __m512i llf_maskz_loadu_epi16_512(__mmask32 k, const void *p) {
    LLF_PARTIAL_LOAD(uint16_t, 32, k, p, llf_loadu_si512(p));
}
LLF_INLINE __m256i llf_maskz_loadu_epi16_256(__mmask16 k, const void *p) {
    LLF_PARTIAL_LOAD(uint16_t, 16, k, p, _mm256_loadu_si256((const __m256i *)p));
}
LLF_INLINE __m128i llf_maskz_loadu_epi8_128(__mmask16 k, const void *p) {
    LLF_PARTIAL_LOAD(uint8_t, 16, k, p, _mm_loadu_si128((const __m128i *)p));
}
LLF_INLINE void llf_mask_storeu_epi16_256(void *p, __mmask16 k, __m256i a) {
    if (k == 0xFFFF) {
        _mm256_storeu_si256((__m256i *)p, a);
        return;
    }
    uint16_t lanes[16];
    _mm256_storeu_si256((__m256i *)lanes, a);
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) ((uint16_t *)p)[i] = lanes[i];
}

#define _mm512_set1_ps llf_set1_ps
#define _mm512_setzero_ps llf_setzero_ps
#define _mm512_setzero_si512 llf_setzero_si512
#define _mm512_set1_epi32 llf_set1_epi32
#define _mm512_set1_epi8 llf_set1_epi8
#define _mm512_loadu_si512 llf_loadu_si512
#define _mm512_load_ps llf_load_ps
#define _mm512_store_ps llf_store_ps
#define _mm512_add_ps llf_add_ps
#define _mm512_sub_ps llf_sub_ps
#define _mm512_mul_ps llf_mul_ps
#define _mm512_div_ps llf_div_ps
#define _mm512_max_ps llf_max_ps
#define _mm512_min_ps llf_min_ps
#define _mm512_fmadd_ps llf_fmadd_ps
#define _mm512_fnmadd_ps llf_fnmadd_ps
#define _mm512_abs_ps llf_abs_ps
#define _mm512_add_epi32 llf_add_epi32
#define _mm512_sub_epi32 llf_sub_epi32
#define _mm512_and_si512 llf_and_si512
#define _mm512_or_si512 llf_or_si512
#undef _mm512_srli_epi32
#define _mm512_srli_epi32 llf_srli_epi32
#undef _mm512_slli_epi32
#define _mm512_slli_epi32 llf_slli_epi32
#undef _mm512_srli_epi16
#define _mm512_srli_epi16 llf_srli_epi16
#define _mm512_castsi512_ps llf_castsi512_ps
#define _mm512_castps_si512 llf_castps_si512
#define _mm512_cvtepi32_ps llf_cvtepi32_ps
#define _mm512_cvtps_epi32 llf_cvtps_epi32
#undef _mm512_roundscale_ps
#define _mm512_roundscale_ps llf_roundscale_ps
#define _mm512_scalef_ps llf_scalef_ps
#define _mm512_cvtepu16_epi32 llf_cvtepu16_epi32
#define _mm512_cvtepu8_epi32 llf_cvtepu8_epi32
#define _mm512_cvtepi8_epi32 llf_cvtepi8_epi32
#define _mm512_cvtph_ps llf_cvtph_ps
#define _mm512_cvtepi32_epi16 llf_cvtepi32_epi16
#define _mm512_cvtepi32_epi8 llf_cvtepi32_epi8
#define _mm512_reduce_add_ps llf_reduce_add_ps
#define _mm512_reduce_max_ps llf_reduce_max_ps
#define _mm512_reduce_add_epi32 llf_reduce_add_epi32
#define _mm512_dpbf16_ps llf_dpbf16_ps
#define _mm512_dpwssd_epi32 llf_dpwssd_epi32
#undef _mm512_cmp_ps_mask
#define _mm512_cmp_ps_mask llf_cmp_ps_mask
#define _mm512_maskz_mov_ps llf_maskz_mov_ps
#define _mm512_mask_blend_ps llf_mask_blend_ps
#define _mm_mask_test_epi8_mask llf_mask_test_epi8_mask
#define _mm512_maskz_loadu_ps llf_maskz_loadu_ps
#define _mm512_mask_storeu_ps llf_mask_storeu_ps
#define _mm512_maskz_loadu_epi16 llf_maskz_loadu_epi16_512
#define _mm256_maskz_loadu_epi16 llf_maskz_loadu_epi16_256
#define _mm_maskz_loadu_epi8 llf_maskz_loadu_epi8_128
#define _mm256_mask_storeu_epi16 llf_mask_storeu_epi16_256

#endif
