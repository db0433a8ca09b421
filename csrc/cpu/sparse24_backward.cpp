// The backward products of y = x W^T for a 2:4 weight W [N, K] (values [N, K/2], meta
// [N, K/4], as sparse24_mm.cpp) on the CPU, in W's own layout:
//
//   sparse24_mm_t:   dx [..., K]      = dy [..., N] W
//   sparse24_sddmm:  dvalues [N, K/2] = (dy^T x) at W's kept positions, in values' layout
//
// Why not the CSR view's spmm_t and sddmm, which the layer also keeps: spmm_t reads W's
// values in W^T's order through t_perm, a gather over all N K / 2 values per call in
// which consecutive reads lie a row of W (K / 2 values, pages) apart: on a Sapphire
// Rapids core each read missed the TLB, and at 4096 x 4096 the gather alone took ~43 ms,
// against ~1 ms for the 2:4 forward that streams the same values. sddmm gathers x's panel
// rows by column index, with no K slicing. Here both products stream values and meta
// in their order (no column indices, no transpose map) and slice K so that what is
// reused stays in L1:
// * sparse24_mm_t, past 16 batch rows with SIMD row kernels, goes by combination
//   (mm_t_buckets): within a slice of W's rows, each group's rows sorted by which two of
//   its four columns they keep (6 combinations), so that the group's four dx^T rows stay
//   in registers and each of W's rows adds its dy line, loaded once, to both of its kept
//   columns. Elsewhere it scatters: for each row o of W, dy's panel row o times each kept
//   weight is added to dx^T's row of that weight's column (simd_rows.inc's scatter24), a
//   task being (batch panel, K slice) with its dx^T rows in L1, a load and a store per
//   FMA. EPYC (AVX-512), 2 threads, ms, combination / scatter / dense GEMM: (256, 4096 ->
//   4096) 28.5 / 115 / 47.1; (2048, 768 -> 3072) 35.1 / 59.2 / 46.9; (64, 1024 -> 1024)
//   0.76 / 1.10 / 1.01. A task owns its dx elements, and each sums its terms in a fixed
//   order: no atomics, and the bits do not depend on the threads. Up to kFewRows rows
//   (AVX-512) each row of W is expanded to its columns instead and multiplied into all
//   batch rows at once (mm_t_few_rows), no panels.
// * sparse24_sddmm takes, per row o, the dot products of dy's panel row o with x's
//   panel rows at the row's kept columns (sddmm24), a task being a block of rows that
//   sweeps K in L1-sized slices of x's panel, panel after panel; decode-sized batches
//   skip the panels (sddmm24_few: per vector of kept entries, a permute per batch row).
//   bf16 operands from kDotSddmmMinRows rows on a CPU with AVX512-BF16 take
//   sparse24_dot_sddmm (sparse24_dot_sddmm.cpp) instead: bf16 pairs of batch rows in
//   dot products, the result written as bf16 directly.
#include "csr_common.h"
#include "simd_rows.h"
#include "sparse24_expand.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

namespace sparsekernels::cpu {
namespace {

// Bytes of dx^T's block (sparse24_mm_t) or of x's panel slice (sparse24_sddmm) a task
// keeps in L1 while W's rows stream past.
constexpr int64_t kSliceBytes = 16 * 1024;
constexpr int64_t kRowsPerTask = 32;  // sparse24_sddmm: rows of W per task

// Portable scatter24 (fp64; fp32 without SIMD kernels).
template <typename acc_t, int64_t T>
void scatter24_generic(const acc_t* panel_dy, acc_t* block, const acc_t* vals, const uint8_t* meta, int64_t groups,
                       int64_t g0, int64_t g1, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const acc_t* d = panel_dy + o * T;
    const acc_t* vr = vals + o * 2 * groups;
    const uint8_t* mr = meta + o * groups;
    for (int64_t g = g0; g < g1; ++g) {
      acc_t* b0 = block + (4 * (g - g0) + (mr[g] & 3)) * T;
      acc_t* b1 = block + (4 * (g - g0) + ((mr[g] >> 2) & 3)) * T;
      const acc_t w0 = vr[2 * g], w1 = vr[2 * g + 1];
      for (int64_t j = 0; j < T; ++j) b0[j] += w0 * d[j];
      for (int64_t j = 0; j < T; ++j) b1[j] += w1 * d[j];
    }
  }
}

// Portable sddmm24.
template <typename acc_t, int64_t T>
void sddmm24_generic(const acc_t* panel_dy, const acc_t* panel_x, acc_t* out, const uint8_t* meta, int64_t groups,
                     int64_t g0, int64_t g1, int64_t o0, int64_t o1, bool first) {
  for (int64_t o = o0; o < o1; ++o) {
    const acc_t* d = panel_dy + o * T;
    acc_t* orow = out + o * 2 * groups;
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t code = meta[o * groups + g];
      for (int j = 0; j < 2; ++j) {
        const acc_t* xr = panel_x + (4 * g + ((code >> (2 * j)) & 3)) * T;
        acc_t s = 0;
        for (int64_t t = 0; t < T; ++t) s += d[t] * xr[t];
        orow[2 * g + j] = first ? s : orow[2 * g + j] + s;
      }
    }
  }
}

// dx [M, K] = dy2 [M, N] W over batch panels of width T: tasks (panel, K slice), numbered
// panel-major; dy's panels packed once for all, or by each chunk of tasks for itself
// (chunks_pack_own_panels, as the other products).
template <typename acc_t, int64_t T>
void mm_t_panels(const at::Tensor& dy2, at::Tensor& dx, const at::Tensor& vals, const at::Tensor& meta) {
  static_assert(4 * T * sizeof(acc_t) <= kSliceBytes, "a group's block rows must fit the slice");
  const int64_t k = dx.size(1), groups = k / 4;
  const int64_t p_count = (dy2.size(0) + T - 1) / T;
  const int64_t slice_groups = kSliceBytes / static_cast<int64_t>(4 * T * sizeof(acc_t));
  const int64_t slices = (groups + slice_groups - 1) / slice_groups, tasks = p_count * slices;
  const at::Tensor pdy = chunks_pack_own_panels(p_count, tasks)
                             ? at::Tensor()
                             : pack_panels(dy2, T, c10::CppTypeToScalarType<acc_t>::value, /*slot=*/0);
  const acc_t* v = vals.data_ptr<acc_t>();
  const uint8_t* mt = meta.data_ptr<uint8_t>();
  const int64_t n = dy2.size(1);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    ChunkPanels<acc_t, T> panels(dy2, pdy);
    alignas(64) acc_t block[kSliceBytes / sizeof(acc_t)];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / slices, g0 = (task % slices) * slice_groups;
      const int64_t g1 = std::min(groups, g0 + slice_groups);
      std::fill(block, block + 4 * (g1 - g0) * T, acc_t(0));
      const acc_t* d = panels.panel(p);
      bool done = false;
      if constexpr (std::is_same_v<acc_t, float>) {
        done = with_simd_rows([&](auto rows) {
          decltype(rows)::template scatter24<T>(d, block, v, mt, groups, g0, g1, 0, n);
        });
      }
      if (!done) scatter24_generic<acc_t, T>(d, block, v, mt, groups, g0, g1, 0, n);
      store_block(block, T, 4 * (g1 - g0), p, 4 * g0, dx);
    }
  });
}

// The combination (0-5, in buckets24_t's order) of a valid meta byte c0 | c1 << 2, c0 < c1:
// (0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3).
constexpr int8_t kCombo24[16] = {-1, -1, -1, -1, 0, -1, -1, -1, 1, 3, -1, -1, 2, 4, 5, -1};

// For rows [o0, o0 + s) of W (s <= 256) and groups [ga, ga + ng): each group's rows, as
// offsets in the slice, sorted by combination (stable: in row order within one) into
// rows [ng, s], and how many each combination has into counts [ng, 6]; pos [ng, 6] is
// scratch. With wv, also each row's two kept values (vals: fp32 [N, 2 groups]) in that
// order into wv [ng, s, 2] (values_alias24). Meta was checked (check_meta24).
void sort_slice24(const uint8_t* meta, int64_t groups, int64_t o0, int64_t s, int64_t ga, int64_t ng,
                  uint8_t* rows, int32_t* counts, int32_t* pos, const float* vals = nullptr, float* wv = nullptr) {
  std::fill(counts, counts + 6 * ng, 0);
  for (int64_t i = 0; i < s; ++i) {
    const uint8_t* mr = meta + (o0 + i) * groups + ga;
    for (int64_t g = 0; g < ng; ++g) ++counts[6 * g + kCombo24[mr[g]]];
  }
  for (int64_t g = 0; g < ng; ++g) {
    int32_t at = static_cast<int32_t>(g * s);
    for (int c = 0; c < 6; ++c) {
      pos[6 * g + c] = at;
      at += counts[6 * g + c];
    }
  }
  for (int64_t i = 0; i < s; ++i) {
    const uint8_t* mr = meta + (o0 + i) * groups + ga;
    const float* vr = wv != nullptr ? vals + (o0 + i) * 2 * groups + 2 * ga : nullptr;
    for (int64_t g = 0; g < ng; ++g) {
      const int32_t at = pos[6 * g + kCombo24[mr[g]]]++;
      rows[at] = static_cast<uint8_t>(i);
      if (wv != nullptr) {
        wv[2 * at] = vr[2 * g];
        wv[2 * at + 1] = vr[2 * g + 1];
      }
    }
  }
}

// Rows of W per slice of mm_t_buckets, whatever the panel width: the slices decide the
// order in which a dx element sums its terms, so a fixed size keeps a row's bits
// independent of the batch (past the 16 rows where the scatter takes over); 64-wide
// panels' dy slice is then 16 KiB.
constexpr int64_t kBucketRows = 64;

// dx [M, K] = dy2 [M, N] W (fp32 values, contiguous) over batch panels of width T, by
// combination (Rows::buckets24_t): tasks of ng groups (dx's columns 4 ga .. 4 (ga + ng))
// and pc panels, each sweeping W's rows in slices of kBucketRows; per slice the rows are
// sorted by combination once (sort_slice24) and each of the task's panels' dx^T blocks
// takes them. A task's blocks ([pc, 4 ng, T]) stay in a quarter of the L2, dy's slice
// of a panel (kBucketRows x T floats, at most 16 KiB) in L1. dy is read once per group of ng groups:
// with all panels in a task and few groups each, a (2048, 768 -> 3072) product read its
// 25 MB of panels 24 times, no faster than the dense GEMM.
// Each dx element sums its terms slice by slice, within a slice by combination and row:
// the bits depend neither on the threads, nor on how the tasks were cut, nor on the
// batch (for batches of more than 16 rows). kCopied: the values come from the sort's
// copy (values_alias24).
template <typename Rows, int64_t T, bool kCopied = false>
void mm_t_buckets(const at::Tensor& dy2, at::Tensor& dx, const float* v, const uint8_t* mt) {
  const int64_t m = dy2.size(0), n = dy2.size(1), k = dx.size(1), groups = k / 4;
  const int64_t p_count = (m + T - 1) / T;
  // Panels per task so that 32 groups' blocks fit the budget, then as many groups as fit
  // (8 to 256); at least two tasks per thread while a task keeps 8 groups.
  const int64_t group_bytes = 4 * T * static_cast<int64_t>(sizeof(float));
  // (Capped as sparse24_slice_bytes is: a VM may report an inflated L2.)
  const int64_t budget = std::clamp<int64_t>(l2_cache_bytes() / 4, 64 * 1024, 512 * 1024);
  int64_t pc = std::clamp<int64_t>(budget / (32 * group_bytes), 1, p_count);
  pc = (p_count + (p_count + pc - 1) / pc - 1) / ((p_count + pc - 1) / pc);  // equal chunks
  const int64_t p_tasks = (p_count + pc - 1) / pc;
  int64_t ng = std::clamp<int64_t>(budget / (pc * group_bytes), 8, 256);
  const int64_t want_tasks = 2 * at::get_num_threads();
  if (p_tasks * ((groups + ng - 1) / ng) < want_tasks)
    ng = std::max<int64_t>(8, groups * p_tasks / want_tasks);
  ng = std::min(ng, groups);
  const int64_t g_tasks = (groups + ng - 1) / ng;
  const at::Tensor pdy = pack_panels(dy2, T, at::kFloat, /*slot=*/0);
  const float* d = pdy.data_ptr<float>();
  at::parallel_for(0, g_tasks * p_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> block(static_cast<size_t>(pc * 4 * ng * T));
    std::vector<uint8_t> rows(static_cast<size_t>(ng * kBucketRows));
    std::vector<int32_t> counts(static_cast<size_t>(6 * ng)), pos(static_cast<size_t>(6 * ng));
    std::vector<float> wv(kCopied ? static_cast<size_t>(2 * ng * kBucketRows) : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t ga = (task / p_tasks) * ng, nga = std::min(ng, groups - ga);
      const int64_t pa = (task % p_tasks) * pc, pb = std::min(p_count, pa + pc);
      std::fill(block.begin(), block.end(), 0.0f);
      for (int64_t o0 = 0; o0 < n; o0 += kBucketRows) {
        const int64_t s = std::min(kBucketRows, n - o0);
        sort_slice24(mt, groups, o0, s, ga, nga, rows.data(), counts.data(), pos.data(), v,
                     kCopied ? wv.data() : nullptr);
        for (int64_t p = pa; p < pb; ++p)
          Rows::template buckets24_t<T, kCopied>(d + (p * n + o0) * T, block.data() + (p - pa) * 4 * nga * T,
                                                 rows.data(), counts.data(),
                                                 kCopied ? wv.data() : v + o0 * 2 * groups + 2 * ga, 2 * groups,
                                                 nga, s);
      }
      for (int64_t p = pa; p < pb; ++p)
        store_block(block.data() + (p - pa) * 4 * nga * T, T, 4 * nga, p, 4 * ga, dx);
    }
  });
}

// Whether mm_t_buckets should copy a slice's values into their sorted order (sort_slice24)
// rather than read them in place, for a W with `groups` groups per row: where W's rows
// (8 groups bytes apart) fall into fewer than 8 of the L1's 64 sets, a slice's 64 rows'
// values do not stay in its 8 ways. With AVX2 that mattered (EPYC, AVX2 forced, 2 threads,
// ms, in place / copied: (256, 4096 -> 4096), rows 8 KiB apart, one set: 94.6 / 45.4;
// (2048, 1024 -> 1024), two sets: 29.5 / 22.9; (256, 4096 -> 11008's dx), eight sets:
// 119 / 142; (2048, 768 -> 3072), eight: 53.8 / 57.3); with AVX-512 a row's 8 FMAs hide
// the misses and in place was as fast or faster everywhere (30.5 / 31.4, 13.1 / 12.9,
// 77.2 / 95.3, 33.8 / 37.0).
bool values_alias24(int64_t groups) { return std::gcd<int64_t>(8 * groups, 4096) > 512; }

// dx by combination (mm_t_buckets) for more than 16 batch rows; false elsewhere (the
// caller scatters). With AVX-512 at the panel width for m rows (choose_panel: 32 or 64),
// values read in place; with AVX2 on 16-wide panels (four accumulator rows of 2 ymm in 16
// registers), values copied where their rows alias (values_alias24). EPYC, 2 threads, ms,
// combination / scatter: AVX-512 (256, 4096 -> 4096) 28.5 / 115, (64, 1024 -> 1024) 0.76
// / 1.10; AVX2 forced 45.4 / 105.3, 0.98 / 1.06, (256, 4096 -> 11008's dx) 119 / 254. At
// up to 16 rows (16-wide panels, AVX-512) it was no faster than the scatter: 10.6 against
// 10.6 at 4096 x 4096.
bool mm_t_by_combination(const at::Tensor& dy2, at::Tensor& dx, const at::Tensor& vals, const at::Tensor& meta) {
  if (dy2.size(0) <= 16) return false;
  const float* v = vals.data_ptr<float>();
  const uint8_t* mt = meta.data_ptr<uint8_t>();
  const int64_t t = choose_panel(dy2.size(0));
  const bool copy = values_alias24(meta.size(1));
  bool ran = false;
  with_simd_rows([&](auto rows) {
    using Rows = decltype(rows);
    if constexpr (Rows::buckets24_fits(kMidPanel)) {
      with_panel_width(t, [&](auto width) {
        constexpr int64_t T = decltype(width)::value;
        if constexpr (Rows::buckets24_fits(T)) {
          mm_t_buckets<Rows, T>(dy2, dx, v, mt);
          ran = true;
        }
      });
    } else if constexpr (Rows::buckets24_fits(kNarrowPanel)) {
      if (copy) mm_t_buckets<Rows, kNarrowPanel, true>(dy2, dx, v, mt);
      else mm_t_buckets<Rows, kNarrowPanel, false>(dy2, dx, v, mt);
      ran = true;
    }
  });
  return ran;
}

#if defined(SPARSEKERNELS_EXPAND24)
#define SK_MM_T_FEW_TARGET __attribute__((target("avx512f,avx512bw,avx512vbmi2,bmi2,popcnt")))

// The kept values of 4 groups (8 at v, fp32 or bf16) put at their columns: 16 floats.
template <typename val_t>
SK_MM_T_FEW_TARGET inline __m512 expand_four_groups(const val_t* v, __mmask16 mask) {
  if constexpr (std::is_same_v<val_t, float>) {
    return _mm512_maskz_expandloadu_ps(mask, v);
  } else {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
    return _mm512_maskz_expand_ps(mask, _mm512_castps256_ps512(_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))));
  }
}

// a[m * ld .. + 16) += sum over r of b[r][m] d[r], one FMA per r in order (M batch rows),
// in the lanes of row r's kept weights only (mask[r]): the zeros the expansion put between
// them are not weights, and an FMA on them would turn an inf or NaN of dy into NaNs in
// columns the weight does not have (the panel kernel, which touches kept entries only,
// leaves them alone; a batch's result must not depend on which path it took).
template <int M, int R>
SK_MM_T_FEW_TARGET __attribute__((always_inline)) inline void mm_t_few_add(const __m512 (&b)[R][M], const __m512* d,
                                                                          const __mmask16* mask, float* a,
                                                                          int64_t ld) {
  for (int m = 0; m < M; ++m) {
    __m512 s = _mm512_loadu_ps(a + m * ld);
    for (int r = 0; r < R; ++r) s = _mm512_mask3_fmadd_ps(b[r][m], d[r], s, mask[r]);
    _mm512_storeu_ps(a + m * ld, s);
  }
}

// Rows [o, o + R) of W into acc [M, ld] (column 0 = column 4 g0 of W) over groups [g0,
// g1) (a multiple of 4 groups): per 4 groups, each row's kept values expanded to their 16
// columns (one vpexpandd), then acc[m] += dy[m, o + r] * that, r in order, one FMA each.
template <int M, int R, typename val_t>
SK_MM_T_FEW_TARGET inline void mm_t_few_pass(const float* dyt, float* acc, const val_t* vals, const uint8_t* meta,
                                             int64_t groups, int64_t g0, int64_t g1, int64_t o, int64_t ld) {
  __m512 b[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) b[r][m] = _mm512_set1_ps(dyt[(o + r) * M + m]);
  int64_t g = g0;
  for (; g + 8 <= g1; g += 8) {  // one mask computation for two vectors
    __m512 lo[R], hi[R];
    __mmask16 lo_mask[R], hi_mask[R];
    for (int r = 0; r < R; ++r) {
      uint64_t bytes;
      std::memcpy(&bytes, meta + (o + r) * groups + g, sizeof(bytes));
      const uint64_t mask = expand24_mask(bytes, 0x0F0F0F0F0F0F0F0FULL);
      const val_t* v = vals + (o + r) * 2 * groups + 2 * g;
      lo_mask[r] = static_cast<__mmask16>(mask);
      hi_mask[r] = static_cast<__mmask16>(mask >> 16);
      lo[r] = expand_four_groups(v, lo_mask[r]);
      hi[r] = expand_four_groups(v + 8, hi_mask[r]);
    }
    mm_t_few_add<M, R>(b, lo, lo_mask, acc + 4 * (g - g0), ld);
    mm_t_few_add<M, R>(b, hi, hi_mask, acc + 4 * (g + 4 - g0), ld);
  }
  if (g < g1) {
    __m512 d[R];
    __mmask16 mask[R];
    for (int r = 0; r < R; ++r) {
      uint32_t bytes;
      std::memcpy(&bytes, meta + (o + r) * groups + g, sizeof(bytes));
      mask[r] = static_cast<__mmask16>(expand24_mask(bytes, 0x0F0F0F0FULL));
      d[r] = expand_four_groups(vals + (o + r) * 2 * groups + 2 * g, mask[r]);
    }
    mm_t_few_add<M, R>(b, d, mask, acc + 4 * (g - g0), ld);
  }
}

// All n rows of W into acc [M, ld] (zeroed by the caller), groups [g0, g1) a multiple of
// 4: four rows per pass, the last n % 4 one at a time. Every element sums its terms in
// row order, one FMA each, so the bits depend neither on the passes nor on how K was
// cut into tasks.
template <int M, typename val_t>
SK_MM_T_FEW_TARGET void mm_t_few_avx512(const float* dyt, float* acc, const val_t* vals, const uint8_t* meta,
                                        int64_t groups, int64_t g0, int64_t g1, int64_t n, int64_t ld) {
  int64_t o = 0;
  for (; o + 4 <= n; o += 4) mm_t_few_pass<M, 4>(dyt, acc, vals, meta, groups, g0, g1, o, ld);
  for (; o < n; ++o) mm_t_few_pass<M, 1>(dyt, acc, vals, meta, groups, g0, g1, o, ld);
}
#undef SK_MM_T_FEW_TARGET
#endif

// dx [M, K] (any floating dtype) = dy W for a batch of M <= kFewRows rows (fp32
// compute; fp32 or bf16 values, contiguous) on a CPU where expand24_active(): tasks over K in
// chunks of whole 4-group vectors, each accumulating its columns of all M rows in an L1
// buffer while every row of W streams past (mm_t_few_avx512). A dy row's 16-wide panel
// would leave 16 - M lanes of every FMA empty, and the scatter's load and store per
// kept value bound it: 4096 x 4096, one row, 5.0 ms through the panels.
// Groups past the last whole vector (groups % 4) are added row by row, as the kernel
// would (one FMA per row, in order).
void mm_t_few_rows(const at::Tensor& dy2, at::Tensor& dx, const at::Tensor& vals, const at::Tensor& meta) {
#if defined(SPARSEKERNELS_EXPAND24)
  const int64_t m = dy2.size(0), n = dy2.size(1), k = dx.size(1), groups = k / 4;
  at::Tensor holder;
  const float* dyt = few_rows_operand(dy2, /*transposed=*/true, holder, /*slot=*/0);
  const uint8_t* mt = meta.data_ptr<uint8_t>();
  // Columns per task: at most an L1 buffer's worth for the M rows, and enough tasks for
  // the threads (a chunk's bits do not depend on its width).
  const int64_t whole = groups / 4 * 4;
  const int64_t max_groups = std::max<int64_t>(4, kSliceBytes / (16 * m) / 4 * 4);
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(2 * at::get_num_threads(), whole / 4));
  const int64_t chunk = std::max<int64_t>(4, std::min(max_groups, (whole / want + 3) / 4 * 4));
  const int64_t tasks = std::max<int64_t>(1, (whole + chunk - 1) / chunk);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    // The last task's tail groups (at most 3) widen its rows by up to 12 columns.
    alignas(64) float acc[kSliceBytes / sizeof(float) + kFewRows * 12];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g0 = task * chunk, g1 = std::min(whole, g0 + chunk);
      const int64_t g_end = task == tasks - 1 ? groups : g1;
      const int64_t ld = 4 * (g_end - g0);
      std::fill(acc, acc + m * ld, 0.0f);
      if (g1 > g0) {
        with_few_rows(m, [&](auto few) {
          constexpr int M = decltype(few)::value;
          with_value_data(vals, [&](auto* v) { mm_t_few_avx512<M>(dyt, acc, v, mt, groups, g0, g1, n, ld); });
        });
      }
      if (g_end > g1) {
        with_value_data(vals, [&](auto* v) {
          for (int64_t o = 0; o < n; ++o) {
            for (int64_t g = g1; g < g_end; ++g) {
              const uint8_t code = mt[o * groups + g];
              const float w0 = static_cast<float>(v[o * 2 * groups + 2 * g]);
              const float w1 = static_cast<float>(v[o * 2 * groups + 2 * g + 1]);
              for (int64_t r = 0; r < m; ++r) {
                float* a = acc + r * ld + 4 * (g - g0);
                a[code & 3] = std::fma(dyt[o * m + r], w0, a[code & 3]);
                a[(code >> 2) & 3] = std::fma(dyt[o * m + r], w1, a[(code >> 2) & 3]);
              }
            }
          }
        });
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dx.scalar_type(), "sparse24_mm_t", [&] {
        scalar_t* out = dx.data_ptr<scalar_t>();
        for (int64_t r = 0; r < m; ++r)
          for (int64_t c = 0; c < ld; ++c) out[r * k + 4 * g0 + c] = static_cast<scalar_t>(acc[r * ld + c]);
      });
    }
  });
#else
  TORCH_INTERNAL_ASSERT(false, "mm_t_few_rows needs the AVX-512 expand kernels");
#endif
}

// Groups per K slice of sddmm24 for a slice of `bytes` of the panel: a multiple of the
// groups one reduce_lanes sums (8 for AVX-512, 4 for AVX2), so the horizontal sums, and
// with them the bits, do not depend on the slicing.
int64_t sddmm_slice_groups(int64_t group_bytes) {
  constexpr int64_t kAlign = 8;
  return std::max<int64_t>(kAlign, kSliceBytes / group_bytes / kAlign * kAlign);
}

// Portable sddmm24 over np panels (as the SIMD kernel's, one sum per entry and panel).
template <typename acc_t, int64_t T>
void sddmm24_generic_panels(const acc_t* panel_dy, int64_t dy_stride, const acc_t* panel_x, int64_t x_stride,
                            int64_t np, acc_t* out, const uint8_t* meta, int64_t groups, int64_t g0, int64_t g1,
                            int64_t o0, int64_t o1, bool first) {
  for (int64_t p = 0; p < np; ++p)
    sddmm24_generic<acc_t, T>(panel_dy + p * dy_stride, panel_x + p * x_stride, out, meta, groups, g0, g1, o0, o1,
                              first && p == 0);
}

// out [N, 2 * groups] = the dot products over the batch (dy2 [M, N], x2 [M, K]) at W's
// kept positions, over batch panels of width T: tasks of kRowsPerTask rows of W, each
// sweeping K in slices and, per slice, the panels in order, a few at a time (the
// kernel's sddmm24_panels; the first writes, the others add: each element's sum over the
// batch runs in a fixed order whatever the threads).
template <typename acc_t, int64_t T>
void sddmm24_panels(const at::Tensor& dy2, const at::Tensor& x2, acc_t* out, const at::Tensor& meta) {
  const at::ScalarType ct = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t n = dy2.size(1), k = x2.size(1), groups = k / 4;
  const int64_t p_count = (dy2.size(0) + T - 1) / T;
  const at::Tensor pdy = pack_panels(dy2, T, ct, /*slot=*/0);
  const at::Tensor px = pack_panels(x2, T, ct, /*slot=*/1);
  const acc_t* dyp = pdy.data_ptr<acc_t>();
  const acc_t* xp = px.data_ptr<acc_t>();
  const uint8_t* mt = meta.data_ptr<uint8_t>();
  int per_call = 1;  // panels per kernel call
  if constexpr (std::is_same_v<acc_t, float>) {
    with_simd_rows([&](auto rows) {
      using Rows = decltype(rows);
      per_call = Rows::sddmm24_panels(static_cast<int>(T) / Rows::Ops::kLanes);
    });
  }
  // The slice of x's panels one call reads stays in L1.
  const int64_t slice_groups = sddmm_slice_groups(per_call * 4 * T * static_cast<int64_t>(sizeof(acc_t)));
  at::parallel_for(0, (n + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o0 = task * kRowsPerTask, o1 = std::min(n, o0 + kRowsPerTask);
      for (int64_t g0 = 0; g0 < groups; g0 += slice_groups) {
        const int64_t g1 = std::min(groups, g0 + slice_groups);
        for (int64_t p = 0; p < p_count; p += per_call) {
          const int64_t np = std::min<int64_t>(per_call, p_count - p);
          const acc_t* d = dyp + p * n * T;
          const acc_t* x = xp + p * k * T;
          bool done = false;
          if constexpr (std::is_same_v<acc_t, float>) {
            done = with_simd_rows([&](auto rows) {
              using Rows = decltype(rows);
              auto call = [&](auto panels) {
                Rows::template sddmm24<T, decltype(panels)::value>(d, n * T, x, k * T, out, mt, groups, g0, g1, o0,
                                                                  o1, p == 0);
              };
              if (np == 2) call(std::integral_constant<int, 2>{});
              else call(std::integral_constant<int, 1>{});
            });
          }
          if (!done) sddmm24_generic_panels<acc_t, T>(d, n * T, x, k * T, np, out, mt, groups, g0, g1, o0, o1, p == 0);
        }
      }
    }
  });
}

// out [N, 2 * groups] (fp32) for a batch of M <= kFewRowsBackward rows (fp32 compute, a CPU with
// SIMD kernels): sddmm24_few over tasks of kRowsPerTask rows of W, K in slices of x's M
// rows of at most kSliceBytes. Each task checks its rows' meta bytes before reading them
// (at one row, a separate pass over meta costs a good part of the product); false when
// some task's were invalid (that task was skipped).
bool sddmm24_few_rows(const at::Tensor& dy2, const at::Tensor& x2, float* out, const at::Tensor& meta) {
  const int64_t m = x2.size(0), k = x2.size(1), groups = k / 4, n = dy2.size(1);
  at::Tensor x_holder, dy_holder;
  const float* x = few_rows_operand(x2, /*transposed=*/false, x_holder, /*slot=*/1);
  const float* dyt = few_rows_operand(dy2, /*transposed=*/true, dy_holder, /*slot=*/0);
  const uint8_t* mt = meta.data_ptr<uint8_t>();
  const int64_t slice_groups = sddmm_slice_groups(4 * m * static_cast<int64_t>(sizeof(float)));
  std::atomic<bool> ok{true};
  at::parallel_for(0, (n + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o0 = task * kRowsPerTask, o1 = std::min(n, o0 + kRowsPerTask);
      if (!meta24_valid(mt + o0 * groups, (o1 - o0) * groups)) {
        ok = false;
        continue;
      }
      for (int64_t g0 = 0; g0 < groups; g0 += slice_groups) {
        const int64_t g1 = std::min(groups, g0 + slice_groups);
        with_few_rows<kFewRowsBackward>(m, [&](auto few) {
          constexpr int M = decltype(few)::value;
          with_simd_rows([&](auto rows) {
            decltype(rows)::template sddmm24_few<M>(x, dyt, out, mt, groups, g0, g1, o0, o1);
          });
        });
      }
    }
  });
  return ok.load();
}

}  // namespace

// dx[..., K] = dy[..., N] W for the 2:4 weight W = (values [N, K/2], meta [N, K/4]).
at::Tensor sparse24_mm_t_cpu(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& meta) {
  check_sparse24("sparse24_mm_t", values, meta);
  const int64_t n = values.size(0), k = 4 * meta.size(1);
  TORCH_CHECK_VALUE(dy.dim() >= 1, "sparse24_mm_t: dy must have at least 1 dimension");
  check_dense("sparse24_mm_t", "dy", dy, values.scalar_type(), n);
  const at::Tensor mc = meta.contiguous();
  check_meta24("sparse24_mm_t", mc);
  const int64_t m = leading_rows(dy);
  std::vector<int64_t> out_shape(dy.sizes().begin(), dy.sizes().end());
  out_shape.back() = k;
  if (m == 0 || k == 0) return at::empty(out_shape, dy.options());
  if (n == 0) return at::zeros(out_shape, dy.options());
  const at::ScalarType ct = compute_type(dy.scalar_type());
  // Allocated in the output's shape and returned as is; the kernels write it as [M, K].
  at::Tensor out = at::empty(out_shape, dy.options());
  at::Tensor dx = out.view({m, k});
  const at::Tensor dy2 = dy.reshape({m, n});
  // Up to kFewRows rows: at 9-16 the expanded rows' FMAs (with twice the lanes of the
  // kept weights) cost more than the 16-wide panels' scatter (4096 x 4096, 16 rows: 5.5-6.5
  // against 4.2-4.3 ms).
  if (runs_few_rows(ct, m, kFewRows) && expand24_active()) {
    mm_t_few_rows(dy2, dx, few_rows_values(values), mc);
    return out;
  }
  const at::Tensor v = values_in(values, ct);
  if (ct == at::kFloat && mm_t_by_combination(dy2, dx, v, mc)) return out;
  with_panel_width(choose_panel(m), [&](auto width) {
    constexpr int64_t T = decltype(width)::value;
    if (ct == at::kDouble) mm_t_panels<double, T>(dy2, dx, v, mc);
    else mm_t_panels<float, T>(dy2, dx, v, mc);
  });
  return out;
}

// dvalues [N, K/2] (values' dtype and layout) = (dy^T x) at W's kept positions, for
// dy [..., N] and x [..., K] with the same leading dimensions.
at::Tensor sparse24_sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& values,
                              const at::Tensor& meta) {
  check_sparse24("sparse24_sddmm", values, meta);
  const int64_t n = values.size(0), k = 4 * meta.size(1);
  TORCH_CHECK_VALUE(dy.dim() >= 1 && x.dim() >= 1, "sparse24_sddmm: dy and x must have at least 1 dimension");
  check_dense("sparse24_sddmm", "dy", dy, values.scalar_type(), n);
  check_dense("sparse24_sddmm", "x", x, values.scalar_type(), k);
  check_same_batch("sparse24_sddmm", dy, x);
  const at::Tensor mc = meta.contiguous();
  const int64_t m = leading_rows(dy);
  const at::ScalarType ct = compute_type(dy.scalar_type());
  if (m == 0 || n == 0 || k == 0) {
    check_meta24("sparse24_sddmm", mc);
    return at::zeros(values.sizes(), values.options());
  }
  const at::Tensor dy2 = dy.reshape({m, n}), x2 = x.reshape({m, k});
  if (m >= kDotSddmmMinRows && dy.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16 &&
      bf16_step() >= Bf16Step::kDot) {
    check_meta24("sparse24_sddmm", mc);
    at::Tensor dvalues = at::empty(values.sizes(), values.options());
    sparse24_dot_sddmm(dy2, x2, dvalues, mc);
    return dvalues;
  }
  // Written in the compute dtype: into the result itself where that is values' dtype.
  at::Tensor acc = at::empty(values.sizes(), values.options().dtype(ct));
  if (runs_few_rows(ct, m, kFewRowsBackward)) {
    if (!sddmm24_few_rows(dy2, x2, acc.data_ptr<float>(), mc)) meta24_invalid("sparse24_sddmm");
  } else {
    check_meta24("sparse24_sddmm", mc);
    with_panel_width(choose_panel(m), [&](auto width) {
      constexpr int64_t T = decltype(width)::value;
      if (ct == at::kDouble) sddmm24_panels<double, T>(dy2, x2, acc.data_ptr<double>(), mc);
      else sddmm24_panels<float, T>(dy2, x2, acc.data_ptr<float>(), mc);
    });
  }
  return acc.scalar_type() == values.scalar_type() ? acc : acc.to(values.scalar_type());
}

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  // dx [..., K] = dy [..., N] W for a 2:4 weight W [N, K] (values [N, K/2], meta [N, K/4]),
  // streaming W's rows (no transpose map).
  m.def("sparse24_mm_t(Tensor dy, Tensor values, Tensor meta) -> Tensor");
  // dvalues [N, K/2] = (dy^T x) at W's kept positions, laid out (and typed) as values.
  m.def("sparse24_sddmm(Tensor dy, Tensor x, Tensor values, Tensor meta) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsekernels_C, CPU, m) {
  m.impl("sparse24_mm_t", &sparse24_mm_t_cpu);
  m.impl("sparse24_sddmm", &sparse24_sddmm_cpu);
}

}  // namespace sparsekernels::cpu
