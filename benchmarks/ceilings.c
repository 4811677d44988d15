// What this machine's CPU cores can do at most, measured: the ceilings that decode (memory reads) and prefill
// (integer and bfloat16 dot products) speeds are bounded by. benchmarks/ceilings.py builds and calls it.
//
// Each function returns a result computed from all the work it did, so the compiler cannot drop any of it and a
// test can check that the work was done.

#ifndef LLAMAFORGE_AVX2  // the AVX2 build has avx2_vectors.h forced in, which includes it
#include <immintrin.h>
#endif
#include <stdint.h>

// Read `bytes` (a multiple of 256) of `data` with 64-byte loads on `n_threads` threads, each its own contiguous
// share, as decoding streams weights; the sum of all 32-bit words, wrapping.
uint32_t read_words(const uint8_t *data, int64_t bytes, int n_threads) {
    uint32_t total = 0;
    #pragma omp parallel num_threads(n_threads) reduction(+ : total)
    {
        __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < bytes; i += 256) {
            a = _mm512_add_epi32(a, _mm512_loadu_si512((const void *)(data + i)));
            b = _mm512_add_epi32(b, _mm512_loadu_si512((const void *)(data + i + 64)));
            c = _mm512_add_epi32(c, _mm512_loadu_si512((const void *)(data + i + 128)));
            d = _mm512_add_epi32(d, _mm512_loadu_si512((const void *)(data + i + 192)));
        }
        total += (uint32_t)_mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a, b), _mm512_add_epi32(c, d)));
    }
    return total;
}

#define CHAINS 12  // independent accumulators per thread: enough to hide the instructions' latency

#ifdef LLAMAFORGE_AVX2
// AVX2 has neither instruction; these do what the kernels do instead, as many multiply-adds per round as above.

// `rounds` x CHAINS x 2 VPMADDUBSW + VPMADDWD + VPADDD (32 int8 multiply-adds each: the int8 / int4 kernels' route)
// per thread with all-ones operands; the sum of every thread's lanes (rounds * CHAINS * 64 per thread, wrapping).
int64_t int8_dots(int64_t rounds, int n_threads) {
    int64_t total = 0;
    #pragma omp parallel num_threads(n_threads) reduction(+ : total)
    {
        __m256i ones = _mm256_set1_epi8(1), pairs = _mm256_set1_epi16(1), acc[CHAINS];
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_setzero_si256();
        for (int64_t r = 0; r < rounds; r++) {
            for (int half = 0; half < 2; half++)
                for (int i = 0; i < CHAINS; i++) {
                    acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(ones, ones), pairs));
                    __asm__ volatile("" : "+x"(ones));  // no common subexpression: each product is made
                }
        }
        for (int i = 0; i < CHAINS; i++) total += (int64_t)(uint32_t)llf_reduce_add_epi32((__m512i){{acc[i],
                                                                               _mm256_setzero_si256()}});
    }
    return total;
}

// `rounds` x CHAINS x 4 float32 FMAs (32 multiply-adds: a bfloat16 product is exact in float32, so the bfloat16
// kernels' arithmetic is this, plus unpacking) per thread with operands 1/256; the sum of every thread's lanes:
// each lane gains 4 products of 2^-16 a round, exactly while rounds < 2^23.
double bf16_dots(int64_t rounds, int n_threads) {
    double total = 0;
    #pragma omp parallel num_threads(n_threads) reduction(+ : total)
    {
        __m256 x = _mm256_set1_ps(1.0f / 256.0f), acc[CHAINS];
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t r = 0; r < rounds; r++) {
            for (int step = 0; step < 4; step++)
                for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_fmadd_ps(x, x, acc[i]);
            __asm__ volatile("" : "+x"(x));
        }
        for (int i = 0; i < CHAINS; i++) total += llf_reduce_add_ps((__m512){{acc[i], _mm256_setzero_ps()}});
    }
    return total;
}
#else
// `rounds` x CHAINS VPDPBUSD (64 int8 multiply-adds each) per thread with all-ones operands; the sum of every
// thread's lanes (rounds * CHAINS * 64 per thread, wrapping).
int64_t int8_dots(int64_t rounds, int n_threads) {
    int64_t total = 0;
    #pragma omp parallel num_threads(n_threads) reduction(+ : total)
    {
        __m512i ones = _mm512_set1_epi8(1), acc[CHAINS];
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_setzero_si512();
        for (int64_t r = 0; r < rounds; r++) {
            for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], ones, ones);
            __asm__ volatile("" : "+v"(ones));  // not a loop invariant: the products are made every round
        }
        for (int i = 0; i < CHAINS; i++) total += (int64_t)(uint32_t)_mm512_reduce_add_epi32(acc[i]);
    }
    return total;
}

// `rounds` x CHAINS VDPBF16PS (32 bfloat16 multiply-adds each) per thread with operands 1/256; the sum of every
// thread's lanes: each lane gains 2 products of 2^-16 a round, exactly while rounds < 2^24.
double bf16_dots(int64_t rounds, int n_threads) {
    double total = 0;
    #pragma omp parallel num_threads(n_threads) reduction(+ : total)
    {
        __m512bh x = (__m512bh)_mm512_set1_epi16(0x3B80);  // bfloat16 1/256
        __m512 acc[CHAINS];
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t r = 0; r < rounds; r++) {
            for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_dpbf16_ps(acc[i], x, x);
            __asm__ volatile("" : "+v"(x));
        }
        for (int i = 0; i < CHAINS; i++) total += _mm512_reduce_add_ps(acc[i]);
    }
    return total;
}
#endif
