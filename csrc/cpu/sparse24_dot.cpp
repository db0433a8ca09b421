// The CPU 2:4 product of bf16 batches past the few-rows kernels, on AVX512-BF16 dot
// products: y [M, N] = x [M, K] W^T for bf16 x and values [N, K/2], M > kFewRows.
//
// Why: the fp32 panels widen x and the values to fp32 and spend two loads and two FMAs
// per group and 16 batch rows; on a CPU with AVX512-BF16 but no AMX (AMD Zen 4) the
// bf16 product of (32, 4096 -> 4096) took 5.7 ms there against 3.7 for the CPU's dense
// bf16 GEMM, and the dense GEMM of the decompressed weight ("cpu:dense") as long.
// VDPBF16PS multiplies pairs: lane j += a[2j] b[2j] + a[2j+1] b[2j+1]. A group's two kept
// values are such a pair (values [N, K/2] holds them side by side), broadcast as one
// 32-bit lane; x's two columns they meet must be the matching pairs of 16 batch rows. A
// group's kept positions are one of 6 pairs of its 4 columns, so each panel of x (16 P
// batch rows) is expanded once into all 6 pairings per group ([group][pairing][P][16]
// pairs of bf16), and the row loop is then, per output row and group: a table lookup of
// the meta byte, one 32-bit broadcast of the values and P loads and dot products.
// The expansion is 3x x's bytes, shared by all N rows.
//
// Products of bf16 values are exact in fp32 and the sums are fp32, in group order (each
// dot product adds a group's two products, then the accumulator), so a row's result
// does not depend on the panel, the slice or the thread.
#include "csr_common.h"

#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SPARSEKERNELS_DOT24 1
#endif

namespace sparsekernels::cpu {

#if defined(SPARSEKERNELS_DOT24)
namespace {

constexpr int kPairings = 6;
constexpr int kLanes = 16;  // fp32 accumulator lanes: batch rows per sub-panel
// (i0, i1) of pairing c, and the pairing of a meta byte i0 | i1 << 2 (meta is checked
// before the kernel runs, so only valid bytes reach the table).
constexpr int kPairI0[kPairings] = {0, 0, 0, 1, 1, 2};
constexpr int kPairI1[kPairings] = {1, 2, 3, 2, 3, 3};
constexpr uint8_t kPairingOf[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 3, 0, 0, 2, 4, 5, 0};

constexpr int64_t kRowsPerTask = 48;
// Bytes of expanded x one slice of groups covers, at most: a quarter of the L2, up to
// this. Zen 4 (1 MiB L2), 2 threads, 4096 -> 4096, ms for 9 / 32 / 256 rows: 16 KiB
// slices 5.3 / 4.2 / 31.6, 64 KiB 5.1 / 3.9 / 23.3, 256 KiB 5.1 / 3.8 / 23.0.
constexpr int64_t kSliceBytes = 256 * 1024;

// Panel p (batch rows [16 P p, 16 P (p + 1)) of x2 [M, K], zero past M) expanded into
// out [groups][kPairings][P][16] uint32: the bf16 pair (x[b, 4g + i0], x[b, 4g + i1]) of
// pairing (i0, i1) for batch row b.
template <int P>
void expand_panel(const uint16_t* x, int64_t m, int64_t k, int64_t p, uint32_t* out) {
  const int64_t groups = k / 4;
  for (int s = 0; s < P; ++s) {
    for (int j = 0; j < kLanes; ++j) {
      const int64_t b = (p * P + s) * kLanes + j;
      uint32_t* dst = out + s * kLanes + j;
      if (b >= m) {
        for (int64_t g = 0; g < groups; ++g)
          for (int c = 0; c < kPairings; ++c) dst[(g * kPairings + c) * P * kLanes] = 0;
        continue;
      }
      const uint16_t* row = x + b * k;
      for (int64_t g = 0; g < groups; ++g) {
        const uint16_t* q = row + 4 * g;
        uint32_t* d = dst + g * kPairings * P * kLanes;
        for (int c = 0; c < kPairings; ++c)
          d[c * P * kLanes] = static_cast<uint32_t>(q[kPairI0[c]]) | static_cast<uint32_t>(q[kPairI1[c]]) << 16;
      }
    }
  }
}

// Rows [r, r + R) over groups [g0, g1) into block rows [r - r0, ...) (16 P floats each):
// overwritten when `first`, accumulated into otherwise. xs: the expanded panel at g0.
template <int P, int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void rows_dot24(const uint32_t* xs, float* block,
                                                                        const uint32_t* pairs, const uint8_t* meta,
                                                                        int64_t groups, int64_t g0, int64_t g1,
                                                                        int64_t r0, int64_t r, bool first) {
  // Every loop over the accumulators unrolled, or they leave the registers.
  __m512 acc[R][P];
#pragma GCC unroll 24
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int s = 0; s < P; ++s)
      acc[i][s] = first ? _mm512_setzero_ps() : _mm512_load_ps(block + (r - r0 + i) * P * kLanes + s * kLanes);
  for (int64_t g = g0; g < g1; ++g) {
    const uint32_t* xg = xs + (g - g0) * kPairings * P * kLanes;
#pragma GCC unroll 24
    for (int i = 0; i < R; ++i) {
      const int64_t e = (r + i) * groups + g;
      const uint32_t* xc = xg + kPairingOf[meta[e] & 15] * P * kLanes;
      const __m512i w = _mm512_set1_epi32(static_cast<int>(pairs[e]));
#pragma GCC unroll 4
      for (int s = 0; s < P; ++s)
        acc[i][s] = _mm512_dpbf16_ps(acc[i][s], reinterpret_cast<__m512bh>(_mm512_load_si512(xc + s * kLanes)),
                                     reinterpret_cast<__m512bh>(w));
    }
  }
#pragma GCC unroll 24
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int s = 0; s < P; ++s) _mm512_store_ps(block + (r - r0 + i) * P * kLanes + s * kLanes, acc[i][s]);
}

template <int P>
void sparse24_dot_panels(const at::Tensor& x2, at::Tensor& y, const uint32_t* pairs, const uint8_t* meta,
                         const at::Tensor* bias) {
  // Accumulators in registers: R rows x P sub-panels, at most 24 of the 32 registers.
  constexpr int R = 24 / P;
  constexpr int64_t T = P * kLanes;
  const int64_t m = x2.size(0), k = x2.size(1), n = y.size(1), groups = k / 4;
  const int64_t p_count = (m + T - 1) / T;
  const int64_t panel_words = groups * kPairings * T;  // uint32 per expanded panel
  // The expansion of every panel, in workspace slot 1 (64-byte aligned rows of pairs).
  at::Tensor expanded = workspace(1, {p_count, panel_words}, at::kInt);
  uint32_t* ex = reinterpret_cast<uint32_t*>(expanded.data_ptr<int32_t>());
  const at::Tensor xc = x2.contiguous();
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>());
  at::parallel_for(0, p_count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) expand_panel<P>(xb, m, k, p, ex + p * panel_words);
  });
  const int64_t slice_bytes = std::clamp<int64_t>(l2_cache_bytes() / 4, 16 * 1024, kSliceBytes);
  const int64_t slice_groups = std::max<int64_t>(1, slice_bytes / (kPairings * T * 4));
  const int64_t blocks = (n + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, p_count * blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float block[kRowsPerTask * T];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / blocks, r0 = (task % blocks) * kRowsPerTask;
      const int64_t r1 = std::min(n, r0 + kRowsPerTask);
      const uint32_t* panel = ex + p * panel_words;
      for (int64_t g0 = 0; g0 < groups; g0 += slice_groups) {
        const int64_t g1 = std::min(groups, g0 + slice_groups);
        const uint32_t* xs = panel + g0 * kPairings * T;
        int64_t r = r0;
        for (; r + R <= r1; r += R) rows_dot24<P, R>(xs, block, pairs, meta, groups, g0, g1, r0, r, g0 == 0);
        for (; r < r1; ++r) rows_dot24<P, 1>(xs, block, pairs, meta, groups, g0, g1, r0, r, g0 == 0);
      }
      store_block(block, T, r1 - r0, p, r0, y, bias);
    }
  });
}

}  // namespace

void sparse24_dot(const at::Tensor& x2, at::Tensor& y, const at::Tensor& vals, const at::Tensor& meta,
                  const at::Tensor* bias) {
  const int64_t m = x2.size(0);
  // values [N, K/2] bf16 as one uint32 pair per group (2-byte aligned at least; the
  // kernel reads them as whole uint32, so a copy where the storage is not 4-byte aligned).
  at::Tensor v = vals.contiguous();
  if (reinterpret_cast<uintptr_t>(v.data_ptr()) % 4 != 0) v = v.clone();
  const uint32_t* pairs = static_cast<const uint32_t*>(v.data_ptr());
  const uint8_t* mt = meta.data_ptr<uint8_t>();
  // Sub-panels per panel: 2 (32 rows) up to 32 rows, else 4. Not 1: with one dot product
  // per row and group the loop's bookkeeping (meta lookup, broadcast) dominated: 9 rows,
  // 4096 -> 4096, 5.1 ms against 3.8 for 32 rows with two.
  if (m <= 2 * kLanes) sparse24_dot_panels<2>(x2, y, pairs, mt, bias);
  else sparse24_dot_panels<4>(x2, y, pairs, mt, bias);
}

#else

void sparse24_dot(const at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor*) {
  TORCH_CHECK(false, "sparse24_dot: needs an x86-64 build");
}

#endif

}  // namespace sparsekernels::cpu
