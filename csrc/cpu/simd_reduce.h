// reduce16: the horizontal sums of 16 AVX-512 vectors at once, for the kernels that end
// a non-zero's work with a T-wide dot product (sddmm, the fused spmm backward).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace sparsekernels::cpu {

// Sums each of 16 vectors horizontally: result lane i = sum of v[i]'s 16 lanes. A shuffle
// tree costs ~45 instructions for 16 dot products (~3 per non-zero) instead of ~8 each
// for _mm512_reduce_add_ps.
__attribute__((target("avx512f"))) inline __m512 reduce16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i) {
    // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3].
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {
    // Per 128-bit lane: partial sums of v[4i], v[4i+1], v[4i+2], v[4i+3] in that order.
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // Fold the four 128-bit lanes: c = [u0 L0+L1, u0 L2+L3, u1 L0+L1, u1 L2+L3].
  const __m512 c = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88),
                                 _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 d = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88),
                                 _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x88), _mm512_shuffle_f32x4(c, d, 0xDD));
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
