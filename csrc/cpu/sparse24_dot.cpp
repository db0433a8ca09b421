// The CPU 2:4 product of bf16 batches past the few-rows kernels, on AVX512-BF16 dot
// products: y [M, N] = x [M, K] W^T for bf16 x and values [N, K/2], M >= kDotMinRows.
//
// Why: the fp32 panels widen x and the values to fp32 and spend two loads and two FMAs
// per group and 16 batch rows; on a CPU with AVX512-BF16 but no AMX (AMD Zen 4) the
// bf16 product of (32, 4096 -> 4096) took 5.7 ms there against 3.7 for the CPU's dense
// bf16 GEMM, and the dense GEMM of the decompressed weight ("cpu:dense") as long.
// VDPBF16PS multiplies pairs: lane j += a[2j] b[2j] + a[2j+1] b[2j+1]. A group's two kept
// values are such a pair (values [N, K/2] holds them side by side as one 32-bit word).
//
// The lanes hold 16 output rows. For a block of 16 rows and one group, a vector holds
// the rows' value pairs and another the rows' word indices (which two of the group's 4
// columns each row keeps, from its meta byte, as places in x's 8-group octet). Per batch
// row and group, x's octet around the group is one 64-byte load (from L1 for the next 7
// groups); one VPERMW by the indices gives every lane the two x values its row meets, and
// one dot product adds them in. The pairs and indices of kBlocks blocks are loaded once
// per kBatch batch rows, and x is read in place.
//
// Why not the batch in the lanes (this file's first form): there each lane needed x's
// pair at the row's two columns, so x was expanded into all 6 pairings per group (3x its
// bytes) and every dot product loaded its own 64 bytes of them. That ran at the load
// ports' rate, 2.3 G dot products per second and core on Zen 4 with everything in L1
// (the unit allows 3.65), and the product of (256, 4096 -> 4096) took 22.1 ms at 2
// threads against the dense bf16 GEMM's 20.3. A distinct permute before every dot
// product bounds the pair at about 2.7 G per second (DEVELOPERS.md), and a broadcast of
// x's 8 bytes from memory takes the permutes' pipe too: with it the loop lost a further
// quarter against a plain 64-byte load; the product 17.9 -> 15.1 ms.
//
// The pairs and indices of a task's rows are laid out per group ([block][group][16],
// 16 x 16 tiles transposed in registers) once per task and slice of groups: O(N K) work
// against the product's O(M N K / 16) dot products.
//
// Products of bf16 values are exact in fp32 and the sums are fp32, in group order (each
// dot product adds a group's two products, then the accumulator), so a result does not
// depend on the blocking, the slice or the thread, and comes out bit for bit as the
// batch-lane form did. The result is rounded to bf16 as c10::BFloat16 rounds (to
// nearest even, NaN as 0x7FC0), after the bias is added in fp32.
#include "bf16_round.h"
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

constexpr int kLanes = 16;   // output rows per vector
constexpr int kBlocks = 3;   // vectors of output rows per task
constexpr int kBatch = 7;    // batch rows per register block: 21 accumulators, 6 operand vectors
constexpr int64_t kRowsPerTask = kBlocks * kLanes;
// Batch rows per task at most (their fp32 partial sums: 96 KiB), so a task's sums stay
// in L2 between slices and a few output rows still make enough tasks for the threads.
constexpr int64_t kBatchPerTask = 512;
// Bytes of laid-out pairs and indices per slice of groups, at most: a quarter of the L2,
// up to this (Zen 4, 1 MiB L2, one thread, ms at (252, 4096 -> 4096): 128 groups 35.5,
// 256 34.4, all 1024 33.0 with a scalar layout pass; the pass is what differs).
constexpr int64_t kSliceBytes = 256 * 1024;

// The pairs and indices of output rows [r, r + kLanes * blocks) over groups [g0, g1), as
// the row loop reads them: wv / iv [block][g - g0][16] (block stride `slice` groups);
// rows past n get zero pairs (their lanes sum zeros) and index 0.
__attribute__((target("avx512f,avx512bw"))) void lay_out_rows(const uint32_t* pairs, const uint8_t* meta,
                                                              int64_t n, int64_t groups, int64_t r, int blocks,
                                                              int64_t g0, int64_t g1, int64_t slice, uint32_t* wv,
                                                              uint32_t* iv) {
  alignas(64) uint32_t idx[kLanes * kLanes];
  const __m512i three = _mm512_set1_epi32(3);
  // Word c of a tile (group g + c, g a multiple of 16) sits at 4 (c % 8) in its octet's load.
  const __m512i octet = _mm512_mullo_epi32(_mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(4 * 0x10001));
  for (int bl = 0; bl < blocks; ++bl) {
    const int64_t rb = r + bl * kLanes;
    const int64_t rows = std::clamp<int64_t>(n - rb, 0, kLanes);
    uint32_t* wb = wv + bl * slice * kLanes;
    uint32_t* ib = iv + bl * slice * kLanes;
    for (int64_t g = g0; g < g1; g += kLanes) {
      const int64_t cols = std::min<int64_t>(kLanes, g1 - g);
      uint32_t* wd = wb + (g - g0) * kLanes;
      uint32_t* id = ib + (g - g0) * kLanes;
      if (rows == kLanes && cols == kLanes) {
        // Whole tile: the pairs transposed as they are; each row's 16 meta bytes widened
        // to index words first.
        transpose16x16(reinterpret_cast<const float*>(pairs + rb * groups + g), groups, reinterpret_cast<float*>(wd),
                       kLanes);
        for (int l = 0; l < kLanes; ++l) {
          const __m512i m =
              _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(meta + (rb + l) * groups + g)));
          const __m512i w = _mm512_add_epi32(
              _mm512_or_si512(_mm512_and_si512(m, three),
                              _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(m, 2), three), 16)),
              octet);
          _mm512_store_si512(idx + l * kLanes, w);
        }
        transpose16x16(reinterpret_cast<const float*>(idx), kLanes, reinterpret_cast<float*>(id), kLanes);
        continue;
      }
      for (int64_t c = 0; c < cols; ++c) {
        for (int l = 0; l < kLanes; ++l) {
          if (l < rows) {
            const int64_t e = (rb + l) * groups + g + c;
            wd[c * kLanes + l] = pairs[e];
            const uint32_t at = 4 * static_cast<uint32_t>((g + c) % 8);
            id[c * kLanes + l] = (at + (meta[e] & 3)) | (at + ((meta[e] >> 2) & 3)) << 16;
          } else {
            wd[c * kLanes + l] = 0;
            id[c * kLanes + l] = 0;
          }
        }
      }
    }
  }
}

// Batch rows [0, R) of x (row stride xs, at the slice's first group, a multiple of 8)
// against B blocks of laid-out rows over `count` groups; sums [R][kRowsPerTask] fp32,
// overwritten when `first`, accumulated into otherwise. Groups from `full` on lie in the
// row's last, partial octet, whose words `tail` masks.
template <int B, int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void dot_rows(const uint16_t* x, int64_t xs,
                                                                      const uint32_t* wv, const uint32_t* iv,
                                                                      int64_t slice, int64_t count, int64_t full,
                                                                      __mmask32 tail, float* sums, bool first) {
  // Every loop over the accumulators unrolled, or they leave the registers.
  __m512 acc[B][R];
#pragma GCC unroll 8
  for (int o = 0; o < B; ++o)
#pragma GCC unroll 8
    for (int b = 0; b < R; ++b)
      acc[o][b] = first ? _mm512_setzero_ps() : _mm512_load_ps(sums + b * kRowsPerTask + o * kLanes);
  for (int64_t g = 0; g < count; ++g) {
    __m512i w[B], ix[B];
#pragma GCC unroll 8
    for (int o = 0; o < B; ++o) {
      w[o] = _mm512_load_si512(wv + (o * slice + g) * kLanes);
      ix[o] = _mm512_load_si512(iv + (o * slice + g) * kLanes);
    }
#pragma GCC unroll 8
    for (int b = 0; b < R; ++b) {
      // x's 8 groups around g, as one load (a broadcast would take the permutes' pipe);
      // past `full`, only the row's groups (the last octet of a row may be partial).
      const uint16_t* xo = x + b * xs + 32 * (g / 8);
      const __m512i xq = g < full ? _mm512_loadu_si512(xo) : _mm512_maskz_loadu_epi16(tail, xo);
#pragma GCC unroll 8
      for (int o = 0; o < B; ++o)
        acc[o][b] = _mm512_dpbf16_ps(acc[o][b], reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(ix[o], xq)),
                                     reinterpret_cast<__m512bh>(w[o]));
    }
  }
#pragma GCC unroll 8
  for (int o = 0; o < B; ++o)
#pragma GCC unroll 8
    for (int b = 0; b < R; ++b) _mm512_store_ps(sums + b * kRowsPerTask + o * kLanes, acc[o][b]);
}

template <int B>
void dot_rows_tail(int rows, const uint16_t* x, int64_t xs, const uint32_t* wv, const uint32_t* iv, int64_t slice,
                   int64_t count, int64_t full, __mmask32 tail, float* sums, bool first) {
  switch (rows) {
    case 1: return dot_rows<B, 1>(x, xs, wv, iv, slice, count, full, tail, sums, first);
    case 2: return dot_rows<B, 2>(x, xs, wv, iv, slice, count, full, tail, sums, first);
    case 3: return dot_rows<B, 3>(x, xs, wv, iv, slice, count, full, tail, sums, first);
    case 4: return dot_rows<B, 4>(x, xs, wv, iv, slice, count, full, tail, sums, first);
    case 5: return dot_rows<B, 5>(x, xs, wv, iv, slice, count, full, tail, sums, first);
    case 6: return dot_rows<B, 6>(x, xs, wv, iv, slice, count, full, tail, sums, first);
    default: return dot_rows<B, kBatch>(x, xs, wv, iv, slice, count, full, tail, sums, first);
  }
}

// Batch rows [b0, b1) against the B blocks laid out for one slice of `count` groups.
template <int B>
void dot_batch(const uint16_t* x, int64_t xs, int64_t b0, int64_t b1, const uint32_t* wv, const uint32_t* iv,
               int64_t slice, int64_t count, int64_t full, __mmask32 tail, float* sums, bool first) {
  for (int64_t b = b0; b < b1; b += kBatch) {
    const int rows = static_cast<int>(std::min<int64_t>(kBatch, b1 - b));
    dot_rows_tail<B>(rows, x + b * xs, xs, wv, iv, slice, count, full, tail, sums + (b - b0) * kRowsPerTask, first);
  }
}

// y[b, r + c] = bf16(sums[b - b0][c] (+ bias[r + c])) for c < cols, rounded as
// c10::BFloat16 rounds (nearest even; NaN as 0x7FC0). Without a bias the sums are stored
// as they are (adding zeros would turn -0 into +0).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void store_rows(const float* sums, int64_t b0, int64_t b1, int64_t r,
                                                            int64_t cols, uint16_t* y, int64_t ys,
                                                            const uint16_t* bias) {
  for (int64_t c = 0; c < cols; c += kLanes) {
    const int left = static_cast<int>(std::min<int64_t>(kLanes, cols - c));
    const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1u);
    const __m512 add = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                  _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, bias + r + c)), 16))
                            : _mm512_setzero_ps();
    for (int64_t b = b0; b < b1; ++b) {
      __m512 v = _mm512_load_ps(sums + (b - b0) * kRowsPerTask + c);
      if (bias) v = _mm512_add_ps(v, add);
      _mm256_mask_storeu_epi16(y + b * ys + r + c, mask, round_to_bf16(v));
    }
  }
}

}  // namespace

void sparse24_dot(const at::Tensor& x2, at::Tensor& y, const at::Tensor& vals, const at::Tensor& meta,
                  const at::Tensor* bias) {
  TORCH_INTERNAL_ASSERT(y.scalar_type() == at::kBFloat16 && y.is_contiguous());
  const int64_t m = x2.size(0), k = x2.size(1), n = y.size(1), groups = k / 4;
  // values [N, K/2] bf16 as one uint32 pair per group (2-byte aligned at least; the
  // kernel reads them as whole uint32, so a copy where the storage is not 4-byte aligned).
  at::Tensor v = vals.contiguous();
  if (reinterpret_cast<uintptr_t>(v.data_ptr()) % 4 != 0) v = v.clone();
  const uint32_t* pairs = static_cast<const uint32_t*>(v.data_ptr());
  const uint8_t* mt = meta.data_ptr<uint8_t>();
  // x is read in place, 8 groups (64 bytes) at a time: only its columns must be dense.
  const at::Tensor xc = x2.stride(1) == 1 ? x2 : x2.contiguous();
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>());
  const int64_t xs = xc.stride(0);
  uint16_t* yb = reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>());
  const uint16_t* bb = bias ? reinterpret_cast<const uint16_t*>(bias->data_ptr<c10::BFloat16>()) : nullptr;

  // Slices of whole 16-group tiles, equal in size, each within the L2 budget.
  const int64_t tile_bytes = 2 * kBlocks * kLanes * kLanes * static_cast<int64_t>(sizeof(uint32_t));
  const int64_t budget = std::clamp<int64_t>(l2_cache_bytes() / 4, 16 * 1024, kSliceBytes);
  const int64_t tiles = (groups + kLanes - 1) / kLanes, tiles_max = std::max<int64_t>(1, budget / tile_bytes);
  const int64_t slices = (tiles + tiles_max - 1) / tiles_max;
  const int64_t slice = (tiles + slices - 1) / slices * kLanes;  // groups per slice
  // Groups before the row's last, partial octet (x is loaded 8 groups at a time), and the
  // words of that octet the row has.
  const int64_t whole_octets = groups / 8 * 8;
  const __mmask32 tail = static_cast<__mmask32>((uint64_t(1) << (4 * (groups % 8))) - 1);
  const int64_t row_tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t batch_tasks = (m + kBatchPerTask - 1) / kBatchPerTask;
  const int64_t batch_step = (m + batch_tasks - 1) / batch_tasks;
  at::parallel_for(0, row_tasks * batch_tasks, 1, [&](int64_t begin, int64_t end) {
    // This thread's laid-out rows (pairs, then indices) and partial sums, 64-byte aligned.
    const int64_t lay_words = kBlocks * slice * kLanes;
    at::Tensor scratch = workspace(1, {2 * lay_words + batch_step * kRowsPerTask + 16}, at::kInt);
    uint32_t* base = align64(reinterpret_cast<uint32_t*>(scratch.data_ptr<int32_t>()));
    uint32_t* wv = base;
    uint32_t* iv = base + lay_words;
    float* sums = reinterpret_cast<float*>(base + 2 * lay_words);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = (task / batch_tasks) * kRowsPerTask;
      const int64_t b0 = (task % batch_tasks) * batch_step, b1 = std::min(m, b0 + batch_step);
      const int blocks = static_cast<int>(std::min<int64_t>(kBlocks, (n - r + kLanes - 1) / kLanes));
      for (int64_t g0 = 0; g0 < groups; g0 += slice) {
        const int64_t g1 = std::min(groups, g0 + slice);
        lay_out_rows(pairs, mt, n, groups, r, blocks, g0, g1, slice, wv, iv);
        const uint16_t* xg = xb + 4 * g0;
        const int64_t full = std::clamp<int64_t>(whole_octets - g0, 0, g1 - g0);
        if (blocks == 3) dot_batch<3>(xg, xs, b0, b1, wv, iv, slice, g1 - g0, full, tail, sums, g0 == 0);
        else if (blocks == 2) dot_batch<2>(xg, xs, b0, b1, wv, iv, slice, g1 - g0, full, tail, sums, g0 == 0);
        else dot_batch<1>(xg, xs, b0, b1, wv, iv, slice, g1 - g0, full, tail, sums, g0 == 0);
      }
      store_rows(sums, b0, b1, r, std::min<int64_t>(kRowsPerTask, n - r), yb, n, bb);
    }
  });
}

#else

void sparse24_dot(const at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor*) {
  TORCH_CHECK(false, "sparse24_dot: needs an x86-64 build");
}

#endif

}  // namespace sparsekernels::cpu
