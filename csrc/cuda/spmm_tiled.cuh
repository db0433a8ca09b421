// The shared-memory tiled variant of the CSR row kernel (spmm / spmm_t for large batches).
//
// UNVERIFIED ON A GPU: compiled in CI, never run yet (see bench/results/README.md).
//
// Why: the strip kernel (spmm.cu) reads one strip of X^T per non-zero from L1 / L2, so the
// dense operand is fetched nnz x M times in total; random sparsity gives rows few columns
// in common, so L1 catches little of it. Here a block of kTiledWarps x kRowsPerWarp rows
// walks K in chunks of kKChunk: the block stages X^T[chunk, strip] in shared memory once
// (coalesced 16-byte loads) and every non-zero of its rows that falls in the chunk reads
// its strip from there. Each staged element serves about rows x density non-zeros instead
// of ~1.
//
// Needs every row's columns in increasing order (each row keeps a cursor that moves
// forward through the chunks); the caller checks that once per pattern
// (sparsekernels/kernels/launch_plan.py) and uses the strip kernel otherwise. A column
// behind the current chunk (an unsorted row) is skipped, never read out of bounds.
#pragma once

#include "cuda_common.cuh"

namespace sparsekernels::cuda {

constexpr int kTiledWarps = 8;
constexpr int kKChunk = 64;  // rows of X^T staged per step: 32 KiB of shared memory

template <typename scalar_t, typename index_t, bool kPerm, int kRowsPerWarp>
__global__ void __launch_bounds__(kWarp * kTiledWarps)
    csr_rows_tiled_kernel(const scalar_t* __restrict__ xt, scalar_t* __restrict__ yt,
                          const scalar_t* __restrict__ vals, const int32_t* __restrict__ perm,
                          const int32_t* __restrict__ row_ptr, const index_t* __restrict__ col_idx,
                          const int32_t* __restrict__ row_order, int64_t n_rows, int64_t n_cols, int64_t m,
                          bool vec_ok) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int kVec = VecWidth<scalar_t>::value;
  constexpr int kTileM = kWarp * kVec;
  constexpr int kVecsPerTileRow = kTileM / kVec;  // == kWarp
  __shared__ __align__(16) scalar_t tile[kKChunk * kTileM];

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t m_base = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t m0 = m_base + lane * kVec;

  // Per row of this warp: the current group of 32 (column, value) pairs held one per lane
  // (loaded coalesced, read by shuffles), the group's first index, the cursor, the end.
  int64_t row[kRowsPerWarp];
  int32_t cursor[kRowsPerWarp], group[kRowsPerWarp], end[kRowsPerWarp], my_col[kRowsPerWarp];
  acc_t my_val[kRowsPerWarp];
  acc_t acc[kRowsPerWarp][kVec];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t slot = (static_cast<int64_t>(blockIdx.x) * kTiledWarps + warp) * kRowsPerWarp + r;
    row[r] = slot < n_rows ? (row_order ? row_order[slot] : slot) : -1;  // warp-uniform
    cursor[r] = row[r] >= 0 ? row_ptr[row[r]] : 0;
    end[r] = row[r] >= 0 ? row_ptr[row[r] + 1] : 0;
    group[r] = cursor[r];
    const int32_t e = group[r] + lane;
    my_col[r] = e < end[r] ? static_cast<int32_t>(col_idx[e]) : -1;
    my_val[r] = e < end[r] ? to_acc(vals[kPerm ? perm[e] : e]) : acc_t(0);
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[r][i] = acc_t(0);
  }

  for (int64_t k0 = 0; k0 < n_cols; k0 += kKChunk) {
    // Stage X^T[k0 : k0 + kKChunk, m_base : m_base + kTileM]; zeros outside X^T.
    for (int idx = threadIdx.x; idx < kKChunk * kVecsPerTileRow; idx += blockDim.x) {
      const int kr = idx / kVecsPerTileRow, c = (idx % kVecsPerTileRow) * kVec;
      const int64_t k = k0 + kr, mm = m_base + c;
      scalar_t* dst = tile + kr * kTileM + c;
      if (k < n_cols && vec_ok && mm + kVec <= m) {
        *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(xt + k * m + mm));
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) dst[i] = (k < n_cols && mm + i < m) ? xt[k * m + mm + i] : scalar_t(0);
      }
    }
    __syncthreads();
    const int64_t k1 = k0 + kKChunk;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      // Everything below is warp-uniform (one row per warp at a time), so the full-mask
      // shuffles are safe.
      while (cursor[r] < end[r]) {
        const int32_t col = __shfl_sync(0xffffffffu, my_col[r], cursor[r] - group[r]);
        if (col >= k1) break;  // the rest of the row lies in later chunks
        const acc_t w = __shfl_sync(0xffffffffu, my_val[r], cursor[r] - group[r]);
        if (col >= k0) {       // an unsorted row's earlier column is skipped, never read
          acc_t xv[kVec];
          const scalar_t* src = tile + (col - k0) * kTileM + lane * kVec;
          load_vec_shared<scalar_t, kVec>(src, xv);
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[r][i] += w * xv[i];
        }
        ++cursor[r];
        if (cursor[r] - group[r] == kWarp && cursor[r] < end[r]) {  // next group of 32 pairs
          group[r] = cursor[r];
          const int32_t e = group[r] + lane;
          my_col[r] = e < end[r] ? static_cast<int32_t>(col_idx[e]) : -1;
          my_val[r] = e < end[r] ? to_acc(vals[kPerm ? perm[e] : e]) : acc_t(0);
        }
      }
    }
    __syncthreads();  // the tile is rewritten next
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    if (row[r] < 0) continue;
    scalar_t* out = yt + row[r] * m + m0;
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      if (m0 + i < m) out[i] = from_acc<scalar_t>(acc[r][i]);
  }
}

// Rows per warp: 4, so a block covers 32 rows (32 KiB of staged X^T serve them all).
constexpr int kTiledRowsPerWarp = 4;

template <typename scalar_t, typename index_t, bool kPerm>
void launch_tiled(const scalar_t* x, scalar_t* y, const scalar_t* vals, const int32_t* perm, const int32_t* ptr,
                  const index_t* cols, const int32_t* order, int64_t n, int64_t k, int64_t m, cudaStream_t stream) {
  constexpr int kTileM = kWarp * VecWidth<scalar_t>::value;
  constexpr int64_t kRowsPerBlock = kTiledWarps * kTiledRowsPerWarp;
  const dim3 block(kWarp * kTiledWarps);
  const dim3 grid(static_cast<unsigned>((n + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>((m + kTileM - 1) / kTileM));
  TORCH_CHECK_VALUE(grid.y <= 65535, "spmm: batch too large for one launch (", m, " rows)");
  const bool vec_ok = (m * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(x) % 16 == 0;
  csr_rows_tiled_kernel<scalar_t, index_t, kPerm, kTiledRowsPerWarp>
      <<<grid, block, 0, stream>>>(x, y, vals, perm, ptr, cols, order, n, k, m, vec_ok);
}

}  // namespace sparsekernels::cuda
