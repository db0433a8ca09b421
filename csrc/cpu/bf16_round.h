// fp32 -> bf16 rounding in AVX-512 registers, as c10::BFloat16 rounds: to nearest even,
// every NaN as 0x7FC0 (the bf16 dot-product kernels store their fp32 sums with it, so
// their results match what a cast of the same sums with Tensor.to gives).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace sparsekernels::cpu {

// The 16 floats of v rounded to bf16 (16 words).
__attribute__((target("avx512f"), always_inline)) inline __m256i round_to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i h = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
  h = _mm512_mask_mov_epi32(h, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(h);
}

}  // namespace sparsekernels::cpu
#endif
