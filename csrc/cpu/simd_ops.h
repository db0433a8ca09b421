// The fp32 vector operations the CPU row kernels are written in (simd_rows.inc), one
// struct per instruction set: Avx512 (16 lanes, 32 registers) and Avx2 (AVX2 + FMA: 8
// lanes, 16 registers). Every function is always_inline with its instruction set's
// target, so it is only ever compiled into a kernel built for that target; which kernel
// runs is decided at run time (simd_level()), and one binary runs on any x86-64.
// Why AVX2 at all: without it, the portable loops compile to SSE2 (the baseline), and GCC
// kept the CSR accumulators in memory and the gathered rows scalar: servers without
// AVX-512 (AMD EPYC before Zen 4, among others) would run 4-8x below their FMA rate.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SPARSEKERNELS_X86_SIMD 1

namespace sparsekernels::cpu {

#define SK_AVX512_OP __attribute__((target("avx512f"), always_inline)) static inline
#define SK_AVX2_OP __attribute__((target("avx2,fma"), always_inline)) static inline

struct Avx512 {
  using vec = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kRegisters = 32;

  SK_AVX512_OP vec zero() { return _mm512_setzero_ps(); }
  SK_AVX512_OP vec set1(float a) { return _mm512_set1_ps(a); }
  SK_AVX512_OP vec load(const float* p) { return _mm512_loadu_ps(p); }
  SK_AVX512_OP void store(float* p, vec a) { _mm512_storeu_ps(p, a); }
  SK_AVX512_OP vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  SK_AVX512_OP vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  SK_AVX512_OP vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  // The first r < kLanes lanes (the others read as 0 / are left alone).
  SK_AVX512_OP vec load_first(const float* p, int r) { return _mm512_maskz_loadu_ps(first_lanes(r), p); }
  SK_AVX512_OP void store_first(float* p, int r, vec a) { _mm512_mask_storeu_ps(p, first_lanes(r), a); }
  // Two floats at p into lanes 0 and 1, the others zero: an 8-byte load (a masked vector
  // load that spans a line, even where the mask drops the lanes past it, costs a split).
  SK_AVX512_OP vec load_two(const float* p) {
    return _mm512_zextps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p))));
  }

  // 16 bf16 values (raw bits) at p widened to fp32 exactly (the bits shifted up).
  SK_AVX512_OP vec load_bf16(const uint16_t* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }

  // 2:4 groups per vector of kept values: a vector holds the kept values of kGroups24
  // consecutive groups (two each), and their columns span 4 * kGroups24 = two vectors.
  static constexpr int kGroups24 = kLanes / 2;
  using ivec = __m512i;
  // The positions, within the 4 * kGroups24 columns of kGroups24 groups, of the kept
  // values of those groups, from their meta bytes (i0 | i1 << 2 each): lane 2j holds
  // 4j + i0 of group j, lane 2j + 1 holds 4j + i1, in the order the values are stored.
  SK_AVX512_OP ivec positions24(const uint8_t* meta) {
    const __m128i m = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(meta));
    const __m512i twice = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(m, m));  // each byte in two lanes
    const __m512i pos = _mm512_and_si512(_mm512_srlv_epi32(twice, _mm512_setr_epi32(0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0,
                                                                                    2, 0, 2, 0, 2)),
                                         _mm512_set1_epi32(3));
    return _mm512_add_epi32(pos, _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28));
  }
  // The kept values of x's 4 * kGroups24 columns at `positions` (positions24): one
  // two-source permute, no per-value loads.
  SK_AVX512_OP vec pick24(const float* x, ivec positions) {
    return _mm512_permutex2var_ps(_mm512_loadu_ps(x), positions, _mm512_loadu_ps(x + kLanes));
  }

  // Lane i of the result = the sum of in[i]'s 16 lanes, for in[0, 16). A shuffle tree
  // costs ~45 instructions for 16 dot products (~3 per non-zero) instead of ~8 each for
  // _mm512_reduce_add_ps. Each sum pairs the lanes as GCC's _mm512_reduce_add_ps does
  // (elements 8 apart, then 4, 2, 1; bit for bit equal, checked on 200k random vectors).
  SK_AVX512_OP vec reduce_lanes(const vec* in) {
    // Inputs taken in 4 x 4-transposed order (j -> 4 (j % 4) + j / 4), so the sums come
    // out in natural order.
    constexpr int kOrder[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
    __m512 w[8], u[4], c[2];
    for (int i = 0; i < 8; ++i) {  // + 8 apart: the 256-bit halves of two vectors at once
      const __m512 p = in[kOrder[2 * i]], q = in[kOrder[2 * i + 1]];
      w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(p, q, 0x44), _mm512_shuffle_f32x4(p, q, 0xEE));
    }
    for (int j = 0; j < 4; ++j)  // + 4 apart: the two 128-bit lanes of each half
      u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * j], w[2 * j + 1], 0x88),
                           _mm512_shuffle_f32x4(w[2 * j], w[2 * j + 1], 0xDD));
    for (int m = 0; m < 2; ++m) {  // + 2 apart
      const __m512d a = _mm512_castps_pd(u[2 * m]), b = _mm512_castps_pd(u[2 * m + 1]);
      c[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));  // + 1 apart
  }

 private:
  SK_AVX512_OP __mmask16 first_lanes(int r) { return static_cast<__mmask16>((1u << r) - 1u); }
};

struct Avx2 {
  using vec = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kRegisters = 16;

  SK_AVX2_OP vec zero() { return _mm256_setzero_ps(); }
  SK_AVX2_OP vec set1(float a) { return _mm256_set1_ps(a); }
  SK_AVX2_OP vec load(const float* p) { return _mm256_loadu_ps(p); }
  SK_AVX2_OP void store(float* p, vec a) { _mm256_storeu_ps(p, a); }
  SK_AVX2_OP vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  SK_AVX2_OP vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  SK_AVX2_OP vec fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  SK_AVX2_OP vec load_first(const float* p, int r) { return _mm256_maskload_ps(p, first_lanes(r)); }
  SK_AVX2_OP void store_first(float* p, int r, vec a) { _mm256_maskstore_ps(p, first_lanes(r), a); }

  SK_AVX2_OP vec load_two(const float* p) {
    return _mm256_zextps128_ps256(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p))));
  }

  SK_AVX2_OP vec load_bf16(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }

  // As Avx512's: 4 groups per vector of kept values, their 16 columns in two vectors.
  static constexpr int kGroups24 = kLanes / 2;
  using ivec = __m256i;
  SK_AVX2_OP ivec positions24(const uint8_t* meta) {
    int32_t bytes;
    __builtin_memcpy(&bytes, meta, sizeof(bytes));
    const __m128i m = _mm_cvtsi32_si128(bytes);
    const __m256i twice = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(m, m));
    const __m256i pos = _mm256_and_si256(_mm256_srlv_epi32(twice, _mm256_setr_epi32(0, 2, 0, 2, 0, 2, 0, 2)),
                                         _mm256_set1_epi32(3));
    return _mm256_add_epi32(pos, _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12));
  }
  // Lanes 0-3 come from the first vector (groups 0 and 1), lanes 4-7 from the second;
  // the permute reads only the low 3 bits of each position, which is the position
  // within that vector in both cases.
  SK_AVX2_OP vec pick24(const float* x, ivec positions) {
    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x), positions);
    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + kLanes), positions);
    return _mm256_blend_ps(lo, hi, 0xF0);
  }

  // Lane i of the result = the sum of in[i]'s 8 lanes, for in[0, 8): three rounds of
  // horizontal adds (pairs, then pairs of pairs, within each 128-bit half), then the two
  // halves: ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)) for every sum.
  SK_AVX2_OP vec reduce_lanes(const vec* in) {
    const __m256 t0 = _mm256_hadd_ps(in[0], in[1]), t1 = _mm256_hadd_ps(in[2], in[3]);
    const __m256 t2 = _mm256_hadd_ps(in[4], in[5]), t3 = _mm256_hadd_ps(in[6], in[7]);
    // Low half: the sums of in[0..3]'s low lanes, high half: of their high lanes.
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  }

 private:
  SK_AVX2_OP __m256i first_lanes(int r) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
};

// Avx512's operations plus those of the bf16 dot-product step of the 2:4 few-rows kernel
// (AVX512-BF16, with AVX512BW's 16-bit permutes and widenings). Compiled into
// RowsAvx512Bf16 only, which runs where the CPU has both (bf16_step() >= Bf16Step::kDot).
#define SK_AVX512_BF16_OP __attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline)) static inline

struct Avx512Bf16 : Avx512 {
  // 32 raw bf16 values at p.
  SK_AVX512_BF16_OP __m512i load_words(const uint16_t* p) { return _mm512_loadu_si512(p); }
  // positions24 for 16-bit lanes: the positions, within the 64 columns of 16 groups, of
  // their 32 kept values (word 2j: 4j + i0 of group j, word 2j + 1: 4j + i1), from 16
  // meta bytes.
  SK_AVX512_BF16_OP __m512i positions24_words(const uint8_t* meta) {
    alignas(64) static constexpr uint16_t kShift[32] = {0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2,
                                                        0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2};
    alignas(64) static constexpr uint16_t kBase[32] = {0,  0,  4,  4,  8,  8,  12, 12, 16, 16, 20,
                                                       20, 24, 24, 28, 28, 32, 32, 36, 36, 40, 40,
                                                       44, 44, 48, 48, 52, 52, 56, 56, 60, 60};
    const __m128i m = _mm_loadu_si128(reinterpret_cast<const __m128i*>(meta));
    const __m256i twice = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(m, m)),
                                                  _mm_unpackhi_epi8(m, m), 1);  // each byte in two lanes
    const __m512i pos = _mm512_and_si512(_mm512_srlv_epi16(_mm512_cvtepu8_epi16(twice), _mm512_load_si512(kShift)),
                                         _mm512_set1_epi16(3));
    return _mm512_add_epi16(pos, _mm512_load_si512(kBase));
  }
  // x's bf16 values at `positions` (positions24_words) among the 64 at x.
  SK_AVX512_BF16_OP __m512i pick24_words(const uint16_t* x, __m512i positions) {
    return _mm512_permutex2var_epi16(_mm512_loadu_si512(x), positions, _mm512_loadu_si512(x + 32));
  }
  // acc lane j += a[2j] b[2j] + a[2j + 1] b[2j + 1] (bf16 products are exact in fp32).
  SK_AVX512_BF16_OP __m512 dot_bf16(__m512i a, __m512i b, __m512 acc) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
  }
};

#undef SK_AVX512_BF16_OP
#undef SK_AVX512_OP
#undef SK_AVX2_OP

}  // namespace sparsekernels::cpu
#endif
