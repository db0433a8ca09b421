// The CPU 2:4 weight gradient of bf16 batches on AVX512-BF16 dot products:
// dvalues [N, K/2] (bf16) = (dy^T x) at W's kept positions, for bf16 dy [M, N] and x [M, K],
// M >= kDotSddmmMinRows (sparse24_sddmm_cpu's other kernels widen to fp32 panels).
//
// VDPBF16PS adds pairs of products: lane j += a[2j] b[2j] + a[2j+1] b[2j+1]. Here a pair is
// two batch rows: an entry dvalues[o, 2g + i] sums dy[b, o] x[b, c] over b, c being the
// column that row o keeps as its i-th in group g, and each dot product adds rows 2p and
// 2p + 1. dy and x are first packed into such pairs (pack_pairs): dy as [N / 16][P][16]
// words (dy[2p, o], dy[2p + 1, o]) for 16 consecutive o, x as [K / 16][P][16] words for
// 16 consecutive columns (4 groups), P = ceil(M / 2), a missing last row as zero.
//
// The lanes hold 16 rows of W. For a block of 16 rows and 4 groups (a "chunk") the kernel
// keeps 8 sums, one per group and kept value, and 8 index vectors built from the rows'
// meta bytes: the place of each row's i-th kept column among the chunk's 16. Per batch
// pair, one load of dy's 16 rows, one load of x's 16 columns, then per sum one VPERMD of
// x's load by the index (each lane gets the column its row keeps) and one dot product.
// The sums are transposed to rows (16 x 16 register tiles) and rounded to bf16 as
// c10::BFloat16 rounds.
//
// Why this form: on Zen 4 the unit takes one 512-bit dot product per cycle (3.65 G per
// second and core), but a cross-lane permute beside each one caps the pair at about 2.6 G
// (a VPSHUFB or a 256-bit form is no faster), and the alternative with the batch in the
// lanes needs a 64-byte load per dot product plus a horizontal sum per entry. With the
// rows in the lanes every load serves 8 dot products.
//
// Each entry sums its pairs in batch order in one accumulator (no split of the batch
// between tasks), so the result depends neither on the threads nor on the blocking.
// VDPBF16PS treats bf16 subnormal inputs as zero (DAZ): products and sums of normal
// numbers are as in fp32, results below bf16's normal range differ from the fp32 path.
#include "bf16_round.h"
#include "csr_common.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace sparsekernels::cpu {

#if defined(__x86_64__) && defined(__GNUC__)
namespace {

constexpr int kLanes = 16;       // rows of W per vector; also columns of x per chunk
constexpr int kChunkGroups = 4;  // groups per chunk (16 columns)
constexpr int kSums = 2 * kChunkGroups;

// out[j][p][l] = src[2p, 16 j + l] | src[2p + 1, 16 j + l] << 16 (the bf16 words of two
// rows side by side) for block j of 16 columns; zero past m rows and w columns.
// src: [m, w] bf16 words, row stride ss.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void pack_pairs(const uint16_t* src, int64_t ss, int64_t m,
                                                                  int64_t w, int64_t pairs, int64_t j,
                                                                  uint32_t* out) {
  const int64_t cols = std::min<int64_t>(kLanes, w - kLanes * j);
  const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1u);
  uint32_t* o = out + j * pairs * kLanes;
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* r0 = src + 2 * p * ss + kLanes * j;
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, r0));
    const __m512i hi = 2 * p + 1 < m ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, r0 + ss))
                                     : _mm512_setzero_si512();
    _mm512_store_si512(o + p * kLanes, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
}

// sums [count][kSums][16]: lane l of sums[c][2 g + i] = the dot product over all `pairs`
// batch pairs of dy's row block (d: [pairs][16]) with x's chunk c (xq + c xs: [pairs][16])
// at the column row l keeps as its i-th in the chunk's group g. codes[c][l]: row l's 4
// meta bytes for chunk c (byte g = group g), zero for rows or groups that do not exist.
// The chunks are independent: with few pairs, one chunk's sums overlap the next's.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void dot_chunks(const uint32_t* d, const uint32_t* xq,
                                                                     int64_t xs, const uint32_t* codes,
                                                                     int64_t count, int64_t pairs, float* sums) {
  const __m512i three = _mm512_set1_epi32(3);
  for (int64_t c = 0; c < count; ++c) {
    const __m512i meta = _mm512_load_si512(codes + c * kLanes);
    const uint32_t* x = xq + c * xs;
    __m512i ix[kSums];
    __m512 acc[kSums];
#pragma GCC unroll 8
    for (int g = 0; g < kChunkGroups; ++g) {
      const __m512i at = _mm512_set1_epi32(4 * g);
      ix[2 * g] = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(meta, 8 * g), three), at);
      ix[2 * g + 1] = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(meta, 8 * g + 2), three), at);
      acc[2 * g] = _mm512_setzero_ps();
      acc[2 * g + 1] = _mm512_setzero_ps();
    }
    for (int64_t p = 0; p < pairs; ++p) {
      const __m512i dv = _mm512_load_si512(d + p * kLanes);
      const __m512i xv = _mm512_load_si512(x + p * kLanes);
#pragma GCC unroll 8
      for (int s = 0; s < kSums; ++s)
        acc[s] = _mm512_dpbf16_ps(acc[s], reinterpret_cast<__m512bh>(_mm512_permutexvar_epi32(ix[s], xv)),
                                  reinterpret_cast<__m512bh>(dv));
    }
#pragma GCC unroll 8
    for (int s = 0; s < kSums; ++s) _mm512_store_ps(sums + (c * kSums + s) * kLanes, acc[s]);
  }
}

// codes[c - c0][l] for rows [r, r + rows) and chunks [c0, c1) (as dot_chunks reads them):
// each row's 4 meta bytes per chunk, zero past the rows and the groups. Where a row's
// meta is whole 32-bit words (groups % 4 == 0), 16 rows x 16 chunks at a time by a
// register transpose; elsewhere byte by byte.
void chunk_codes(const uint8_t* meta, int64_t groups, int64_t r, int64_t rows, int64_t c0, int64_t c1,
                 uint32_t* codes) {
  int64_t c = c0;
  if (groups % kChunkGroups == 0 && rows == kLanes) {
    for (; c + kLanes <= c1; c += kLanes)
      transpose16x16(reinterpret_cast<const float*>(meta + r * groups + kChunkGroups * c), groups / kChunkGroups,
                     reinterpret_cast<float*>(codes + (c - c0) * kLanes), kLanes);
  }
  for (; c < c1; ++c) {
    const int64_t g = c * kChunkGroups, have = std::min<int64_t>(kChunkGroups, groups - g);
    for (int64_t l = 0; l < kLanes; ++l) {
      uint32_t word = 0;
      if (l < rows) std::memcpy(&word, meta + (r + l) * groups + g, static_cast<size_t>(have));
      codes[(c - c0) * kLanes + l] = word;
    }
  }
}

// Rows [r, r + rows) of dvalues (row stride ld words), columns [c, c + cols): the tile's
// sums ([cols rounded up to 16][16], column-major: tile[col][row]) transposed and rounded.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void store_tile(const float* tile, int64_t rows, int64_t cols,
                                                                  uint16_t* out, int64_t ld, float* row_major) {
  const int64_t width = (cols + kLanes - 1) / kLanes * kLanes;
  for (int64_t t = 0; t < width; t += kLanes) transpose16x16(tile + t * kLanes, kLanes, row_major + t, width);
  for (int64_t l = 0; l < rows; ++l) {
    for (int64_t c = 0; c < cols; c += kLanes) {
      const int left = static_cast<int>(std::min<int64_t>(kLanes, cols - c));
      const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1u);
      _mm256_mask_storeu_epi16(out + l * ld + c, mask, round_to_bf16(_mm512_loadu_ps(row_major + l * width + c)));
    }
  }
}

}  // namespace

void sparse24_dot_sddmm(const at::Tensor& dy2, const at::Tensor& x2, at::Tensor& dvalues, const at::Tensor& meta) {
  TORCH_INTERNAL_ASSERT(dvalues.scalar_type() == at::kBFloat16 && dvalues.is_contiguous());
  const int64_t m = dy2.size(0), n = dy2.size(1), k = x2.size(1), groups = k / 4;
  const int64_t pairs = (m + 1) / 2;
  const int64_t row_blocks = (n + kLanes - 1) / kLanes, chunks = (groups + kChunkGroups - 1) / kChunkGroups;
  // Only the columns must be dense: the packing reads rows by their stride.
  const at::Tensor dyc = dy2.stride(1) == 1 ? dy2 : dy2.contiguous();
  const at::Tensor xc = x2.stride(1) == 1 ? x2 : x2.contiguous();
  const uint16_t* dyb = reinterpret_cast<const uint16_t*>(dyc.data_ptr<c10::BFloat16>());
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>());
  // Both packed operands, 64-byte aligned (16 extra words of slack each).
  const int64_t dy_words = row_blocks * pairs * kLanes, x_words = chunks * pairs * kLanes;
  const at::Tensor dy_buf = workspace(0, {dy_words + kLanes}, at::kInt);
  const at::Tensor x_buf = workspace(1, {x_words + kLanes}, at::kInt);
  uint32_t* dyp = align64(reinterpret_cast<uint32_t*>(dy_buf.data_ptr<int32_t>()));
  uint32_t* xp = align64(reinterpret_cast<uint32_t*>(x_buf.data_ptr<int32_t>()));
  at::parallel_for(0, row_blocks + chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      if (j < row_blocks) pack_pairs(dyb, dyc.stride(0), m, n, pairs, j, dyp);
      else pack_pairs(xb, xc.stride(0), m, k, pairs, j - row_blocks, xp);
    }
  });

  // Tasks: (range of chunks, range of row blocks), chunk-range-major, so that a thread's
  // consecutive tasks share the x chunks they read (a quarter of the L2 at most) while
  // their rows' dy blocks stream past.
  const int64_t chunk_bytes = pairs * kLanes * static_cast<int64_t>(sizeof(uint32_t));
  const int64_t budget = std::clamp<int64_t>(l2_cache_bytes() / 4, 64 * 1024, 512 * 1024);
  const int64_t per_range = std::clamp<int64_t>(budget / chunk_bytes, 1, std::min<int64_t>(chunks, 64));
  const int64_t chunk_ranges = (chunks + per_range - 1) / per_range;
  const int64_t want = 4 * at::get_num_threads();
  const int64_t blocks_per_task =
      std::clamp<int64_t>(row_blocks * chunk_ranges / want, 1, std::max<int64_t>(1, row_blocks / 2));
  const int64_t block_ranges = (row_blocks + blocks_per_task - 1) / blocks_per_task;
  const uint8_t* mt = meta.data_ptr<uint8_t>();
  uint16_t* out = reinterpret_cast<uint16_t*>(dvalues.data_ptr<c10::BFloat16>());
  const int64_t ld = 2 * groups;
  at::parallel_for(0, chunk_ranges * block_ranges, 1, [&](int64_t begin, int64_t end) {
    // Sums of one row block over a chunk range (column-major), the same as rows, and the
    // block's codes for the range, 64-byte aligned.
    const int64_t width = (kSums * per_range + kLanes - 1) / kLanes * kLanes;
    std::vector<float> buf(static_cast<size_t>((2 * width + per_range + 1) * kLanes));
    float* tile = align64(buf.data());
    float* row_major = tile + width * kLanes;
    uint32_t* codes = reinterpret_cast<uint32_t*>(row_major + width * kLanes);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c0 = (task / block_ranges) * per_range, c1 = std::min(chunks, c0 + per_range);
      const int64_t ob0 = (task % block_ranges) * blocks_per_task;
      const int64_t ob1 = std::min(row_blocks, ob0 + blocks_per_task);
      for (int64_t ob = ob0; ob < ob1; ++ob) {
        const int64_t r = ob * kLanes, rows = std::min<int64_t>(kLanes, n - r);
        chunk_codes(mt, groups, r, rows, c0, c1, codes);
        dot_chunks(dyp + ob * pairs * kLanes, xp + c0 * pairs * kLanes, pairs * kLanes, codes, c1 - c0, pairs, tile);
        const int64_t cols = std::min<int64_t>(kSums * (c1 - c0), ld - kSums * c0);
        store_tile(tile, rows, cols, out + r * ld + kSums * c0, ld, row_major);
      }
    }
  });
}

#else

void sparse24_dot_sddmm(const at::Tensor&, const at::Tensor&, at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "sparse24_dot_sddmm: needs an x86-64 build");
}

#endif

}  // namespace sparsekernels::cpu
