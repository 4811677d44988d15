// The kernels' AVX-512 instructions emulated on any CPU, for tests only: kernels.py builds the C sources with this
// header forced in when LLAMAFORGE_KERNELS=emulate, so a machine without AVX-512 still runs the kernels' code (their
// addressing, tiling and rounding) under the tests. SIMDe (SIMD Everywhere: Debian's libsimde-dev) supplies most
// instructions; the few that its 0.7 release lacks are written out below, lane by lane, as Intel documents them.
// Slow: never for measurement.
#ifndef LLAMAFORGE_AVX512_EMULATION_H
#define LLAMAFORGE_AVX512_EMULATION_H

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <math.h>
#include <simde/x86/avx512.h>
#include <stdint.h>
#include <string.h>

// The mask types by their intrinsics' names, unless gcc's immintrin.h declared them (SIMDe includes it when the
// build targets a CPU with AVX).
#ifndef _IMMINTRIN_H_INCLUDED
typedef simde__mmask8 __mmask8;
typedef simde__mmask16 __mmask16;
typedef simde__mmask32 __mmask32;
typedef simde__mmask64 __mmask64;
#endif

#define LANES_OF(type, name, vector, bytes) type name[(bytes) / sizeof(type)]; memcpy(name, &(vector), bytes)

static inline float emulated_reduce_add_ps(simde__m512 a) {  // in gcc's order: halves, then quarters, then pairs
    LANES_OF(float, v, a, 64);
    float eight[8], four[4];
    for (int i = 0; i < 8; i++) eight[i] = v[i] + v[i + 8];
    for (int i = 0; i < 4; i++) four[i] = eight[i] + eight[i + 4];
    return (four[0] + four[2]) + (four[1] + four[3]);
}

static inline float emulated_reduce_max_ps(simde__m512 a) {
    LANES_OF(float, v, a, 64);
    float top = v[0];
    for (int i = 1; i < 16; i++) top = v[i] > top ? v[i] : top;
    return top;
}

static inline int32_t emulated_reduce_add_epi32(simde__m512i a) {
    LANES_OF(int32_t, v, a, 64);
    int32_t total = 0;
    for (int i = 0; i < 16; i++) total += v[i];
    return total;
}

// Conversions between lane widths, each a loop over its lanes.
#define EMULATED_CONVERT(name, from, to, in_type, out_type, in_bytes, out_bytes, expression) \
    static inline out_type name(in_type a) {                                                \
        LANES_OF(from, in, a, in_bytes);                                                     \
        to out[16];                                                                          \
        for (int i = 0; i < 16; i++) out[i] = (to)(expression);                              \
        out_type r;                                                                          \
        memcpy(&r, out, out_bytes);                                                          \
        return r;                                                                            \
    }
EMULATED_CONVERT(emulated_cvtepu16_epi32, uint16_t, uint32_t, simde__m256i, simde__m512i, 32, 64, in[i])
EMULATED_CONVERT(emulated_cvtepu8_epi32, uint8_t, int32_t, simde__m128i, simde__m512i, 16, 64, in[i])
EMULATED_CONVERT(emulated_cvtepi8_epi32, int8_t, int32_t, simde__m128i, simde__m512i, 16, 64, in[i])
EMULATED_CONVERT(emulated_cvtepi32_epi16, int32_t, int16_t, simde__m512i, simde__m256i, 64, 32, in[i])
EMULATED_CONVERT(emulated_cvtepi32_epi8, int32_t, int8_t, simde__m512i, simde__m128i, 64, 16, in[i])
EMULATED_CONVERT(emulated_cvtepi32_ps, int32_t, float, simde__m512i, simde__m512, 64, 64, in[i])
EMULATED_CONVERT(emulated_cvtps_epi32, float, int32_t, simde__m512, simde__m512i, 64, 64, nearbyintf(in[i]))
EMULATED_CONVERT(emulated_cvtph_ps, _Float16, float, simde__m256i, simde__m512, 32, 64, in[i])

// Masked loads (zero where the mask bit is clear) and stores (memory untouched there).
#define EMULATED_MASKZ_LOAD(name, type, lanes, out_type, mask_type)             \
    static inline out_type name(mask_type k, const void *p) {                    \
        type lanes_[lanes] = {0};                                                \
        for (int i = 0; i < (lanes); i++)                                        \
            if (k >> i & 1) lanes_[i] = ((const type *)p)[i];                     \
        out_type r;                                                              \
        memcpy(&r, lanes_, sizeof(lanes_));                                      \
        return r;                                                                \
    }
EMULATED_MASKZ_LOAD(emulated_maskz_loadu_epi16_512, uint16_t, 32, simde__m512i, uint32_t)
EMULATED_MASKZ_LOAD(emulated_maskz_loadu_epi16_256, uint16_t, 16, simde__m256i, uint16_t)
EMULATED_MASKZ_LOAD(emulated_maskz_loadu_epi8_128, uint8_t, 16, simde__m128i, uint16_t)
EMULATED_MASKZ_LOAD(emulated_maskz_loadu_ps, float, 16, simde__m512, uint16_t)

#define EMULATED_MASK_STORE(name, type, lanes, in_type)                          \
    static inline void name(void *p, uint16_t k, in_type a) {                     \
        LANES_OF(type, v, a, sizeof(type) * (lanes));                             \
        for (int i = 0; i < (lanes); i++)                                         \
            if (k >> i & 1) ((type *)p)[i] = v[i];                                \
    }
EMULATED_MASK_STORE(emulated_mask_storeu_epi16_256, uint16_t, 16, simde__m256i)
EMULATED_MASK_STORE(emulated_mask_storeu_ps, float, 16, simde__m512)

static inline uint16_t emulated_mask_test_epi8_mask(uint16_t k, simde__m128i a, simde__m128i b) {
    LANES_OF(uint8_t, x, a, 16);
    LANES_OF(uint8_t, y, b, 16);
    uint16_t bits = 0;
    for (int i = 0; i < 16; i++)
        if ((k >> i & 1) && (x[i] & y[i])) bits |= (uint16_t)(1u << i);
    return bits;
}

static inline float emulated_cvtsh_ss(uint16_t bits) {
    _Float16 half;
    memcpy(&half, &bits, 2);
    return (float)half;
}

#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#define _MM_FROUND_TO_NEAREST_INT SIMDE_MM_FROUND_TO_NEAREST_INT
#endif
#undef _cvtsh_ss
#define _cvtsh_ss emulated_cvtsh_ss
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps emulated_reduce_add_ps
#undef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps emulated_reduce_max_ps
#undef _mm512_reduce_add_epi32
#define _mm512_reduce_add_epi32 emulated_reduce_add_epi32
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32 emulated_cvtepu16_epi32
#undef _mm512_cvtepu8_epi32
#define _mm512_cvtepu8_epi32 emulated_cvtepu8_epi32
#undef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32 emulated_cvtepi8_epi32
#undef _mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi16 emulated_cvtepi32_epi16
#undef _mm512_cvtepi32_epi8
#define _mm512_cvtepi32_epi8 emulated_cvtepi32_epi8
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps emulated_cvtepi32_ps
#undef _mm512_cvtps_epi32
#define _mm512_cvtps_epi32 emulated_cvtps_epi32
#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps emulated_cvtph_ps
#undef _mm512_maskz_loadu_epi16
#define _mm512_maskz_loadu_epi16 emulated_maskz_loadu_epi16_512
#undef _mm256_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16 emulated_maskz_loadu_epi16_256
#undef _mm_maskz_loadu_epi8
#define _mm_maskz_loadu_epi8 emulated_maskz_loadu_epi8_128
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps emulated_maskz_loadu_ps
#undef _mm256_mask_storeu_epi16
#define _mm256_mask_storeu_epi16 emulated_mask_storeu_epi16_256
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps emulated_mask_storeu_ps
#undef _mm_mask_test_epi8_mask
#define _mm_mask_test_epi8_mask emulated_mask_test_epi8_mask

#endif
