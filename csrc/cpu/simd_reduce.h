// reduce16: the horizontal sums of 16 AVX-512 vectors at once, for the kernels that end
// a non-zero's work with a T-wide dot product (sddmm, the fused spmm backward).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace sparsekernels::cpu {

// Sums each of 16 vectors horizontally: result lane i = sum of in[i]'s 16 lanes. A shuffle
// tree costs ~45 instructions for 16 dot products (~3 per non-zero) instead of ~8 each
// for _mm512_reduce_add_ps. Each sum pairs the lanes as GCC's _mm512_reduce_add_ps does
// (elements 8 apart, then 4, 2, 1; bit for bit equal, checked on 200k random vectors):
// the row tails of sddmm summed that way before this tree existed, so their results kept
// their bits.
__attribute__((target("avx512f"))) inline __m512 reduce16(const __m512* in) {
  // Inputs taken in 4 x 4-transposed order (j -> 4 (j % 4) + j / 4), so the sums come out
  // in natural order.
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

// out[0, r) += the horizontal sums of v[0, r), r < 16, through reduce16 with the other
// vectors zero: a dot product's bits then do not depend on whether it was summed in a
// full group of 16 or in a row's tail (so sddmm and the fused backward, which group the
// same entries differently, agree exactly). v[r, 16) is overwritten.
__attribute__((target("avx512f"))) inline void add_reduced_tail(float* out, __m512* v, int r) {
  for (int i = r; i < 16; ++i) v[i] = _mm512_setzero_ps();
  const __mmask16 m = static_cast<__mmask16>((1u << r) - 1u);
  _mm512_mask_storeu_ps(out, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, out), reduce16(v)));
}

}  // namespace sparsekernels::cpu
#endif
