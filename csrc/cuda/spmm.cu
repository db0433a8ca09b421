// spmm / spmm_t on NVIDIA GPUs: Y = X W^T for a CSR weight W [N, K].
//
// UNVERIFIED ON A GPU: compiled in CI, never run yet (see bench/results/README.md).
//
// Layout (as Sputnik, Gale et al. 2020): the dense operand is transposed once to
// X^T [K, M], so the sparse matrix is on the left, Y^T = W X^T, and each non-zero w[n, k]
// reads one contiguous strip X^T[k, m0 : m0 + tile]. Two kernels, by batch size M:
//
// * csr_rows_kernel (M > kSmallM = 32, training / prefill): one warp (or a sub-warp of 8 or
//   16 lanes when M is narrower than a warp's strip) owns one row of W and one strip of M;
//   it loads up to 32 (column, value) pairs with one coalesced load and broadcasts them
//   with shuffles; each lane accumulates kVec consecutive outputs in fp32 registers and
//   reads its part of the strip with ONE 16-byte vector load per non-zero (4 fp32, 8 fp16 /
//   bf16). Strips are re-read by other rows through L1 (__ldg).
// * csr_rows_small_m_kernel (M <= 32, decode and small batches: the weight's bytes
//   dominate, and a strip kernel would leave most lanes idle): one warp per row, lanes
//   split the row's non-zeros (coalesced value / index loads: the bytes that matter), each
//   lane keeps all M partial sums (reading its column of X^T with 16-byte loads when M
//   fills the tile) and the warp reduces them with butterfly shuffles. X (at most 32 x K)
//   stays in L1 / L2.
//
// * csr_rows_tiled_kernel (spmm_tiled.cuh; `tiled=True`, rows with sorted columns): blocks
//   of 32 rows stage X^T chunks in shared memory, so the dense operand is fetched about
//   rows x density times less often.
//
// Load balance: rows are taken in `row_order` (rows sorted by length, longest first; the
// "row swizzle" of Sputnik) so the warps of a block get similar work and the long rows
// start first. Index width: col_idx may be int16 (when the column count fits) to halve the
// index bytes; the caller keeps that narrow copy (sparsekernels/kernels/launch_plan.py).
// spmm_t runs the same kernels on W^T's CSR (the transpose map), reading values through
// t_perm: a gather, no atomics (done once up front when M spans several strips).
//
// Indices are trusted to be in range here (patterns are validated where they are built:
// CSR.from_*, the topology update); an out-of-range column is skipped rather than read,
// so a corrupt pattern can give a wrong result but never an illegal address.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "cuda_common.cuh"
#include "spmm_tiled.cuh"

namespace sparsekernels::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kSmallM = 32;

// kLanes lanes (a sub-warp: 8, 16 or the whole warp) own one row and a strip of
// kLanes * kVec outputs; a warp holds kWarp / kLanes rows. Narrow sub-warps keep every lane
// busy when M is below a full warp's strip (e.g. M = 64 in bf16 is 8 lanes of 8).
template <typename scalar_t, typename index_t, bool kPerm, int kLanes>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
    csr_rows_kernel(const scalar_t* __restrict__ xt, scalar_t* __restrict__ yt,
                    const scalar_t* __restrict__ vals, const int32_t* __restrict__ perm,
                    const int32_t* __restrict__ row_ptr, const index_t* __restrict__ col_idx,
                    const int32_t* __restrict__ row_order, int64_t n_rows, int64_t n_cols, int64_t m,
                    bool vec_ok) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int kVec = VecWidth<scalar_t>::value;
  constexpr int kTileM = kLanes * kVec;
  constexpr int kRowsPerWarp = kWarp / kLanes;
  static_assert(kWarp % kLanes == 0, "sub-warps tile the warp");
  const int lane = threadIdx.x % kWarp;
  const int sub = lane / kLanes, sub_lane = lane % kLanes;
  // Shuffles involve exactly this sub-warp's lanes: the other rows of the warp may run a
  // different number of iterations (or have returned).
  unsigned mask = 0xffffffffu;
  if constexpr (kLanes < kWarp) mask = ((1u << kLanes) - 1u) << (sub * kLanes);
  const int64_t slot = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp) * kRowsPerWarp + sub;
  if (slot >= n_rows) return;  // uniform over the sub-warp
  const int64_t row = row_order ? row_order[slot] : slot;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM + sub_lane * kVec;  // this lane's outputs
  const bool full = vec_ok && m0 + kVec <= m;
  acc_t acc[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) acc[i] = acc_t(0);

  const int32_t start = row_ptr[row], end = row_ptr[row + 1];
  for (int32_t base = start; base < end; base += kLanes) {
    // One coalesced load of up to kLanes (column, value) pairs, then broadcast by shuffles.
    const int32_t e = base + sub_lane;
    int32_t my_col = -1;
    acc_t my_val = acc_t(0);
    if (e < end) {
      my_col = static_cast<int32_t>(col_idx[e]);
      my_val = to_acc(vals[kPerm ? perm[e] : e]);
    }
    const int count = min(kLanes, end - base);
    for (int j = 0; j < count; ++j) {
      const int32_t col = __shfl_sync(mask, my_col, j, kLanes);
      const acc_t w = __shfl_sync(mask, my_val, j, kLanes);
      if (col < 0 || col >= n_cols) continue;  // uniform over the sub-warp; corrupt index: never read
      const scalar_t* strip = xt + static_cast<int64_t>(col) * m + m0;
      if (full) {
        acc_t xv[kVec];
        load_vec<scalar_t, kVec>(strip, xv);
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] += w * xv[i];
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i)
          if (m0 + i < m) acc[i] += w * ldg_acc(strip + i);
      }
    }
  }
  scalar_t* out = yt + row * m + m0;
#pragma unroll
  for (int i = 0; i < kVec; ++i)
    if (m0 + i < m) out[i] = from_acc<scalar_t>(acc[i]);
}

template <typename scalar_t, typename index_t, bool kPerm, int kM>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
    csr_rows_small_m_kernel(const scalar_t* __restrict__ xt, scalar_t* __restrict__ yt,
                            const scalar_t* __restrict__ vals, const int32_t* __restrict__ perm,
                            const int32_t* __restrict__ row_ptr, const index_t* __restrict__ col_idx,
                            const int32_t* __restrict__ row_order, int64_t n_rows, int64_t n_cols,
                            int64_t m, bool vec_full) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int kVec = VecWidth<scalar_t>::value;
  const int lane = threadIdx.x % kWarp;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (slot >= n_rows) return;  // warp-uniform
  const int64_t row = row_order ? row_order[slot] : slot;
  acc_t acc[kM];
#pragma unroll
  for (int j = 0; j < kM; ++j) acc[j] = acc_t(0);
  const int32_t start = row_ptr[row], end = row_ptr[row + 1];
  for (int32_t e = start + lane; e < end; e += kWarp) {
    const int32_t col = static_cast<int32_t>(col_idx[e]);
    if (col < 0 || col >= n_cols) continue;  // corrupt index: never read
    const acc_t w = to_acc(vals[kPerm ? perm[e] : e]);
    const scalar_t* xcol = xt + static_cast<int64_t>(col) * m;
    if constexpr (kM % kVec == 0) {
      if (vec_full) {  // m == kM and 16-byte aligned columns: kM / kVec vector loads
#pragma unroll
        for (int c = 0; c < kM / kVec; ++c) {
          acc_t xv[kVec];
          load_vec<scalar_t, kVec>(xcol + c * kVec, xv);
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[c * kVec + i] += w * xv[i];
        }
        continue;
      }
    }
#pragma unroll
    for (int j = 0; j < kM; ++j)
      if (j < m) acc[j] += w * ldg_acc(xcol + j);
  }
#pragma unroll
  for (int j = 0; j < kM; ++j) acc[j] = warp_sum(acc[j]);  // every lane holds every sum
  scalar_t* out = yt + row * m;
#pragma unroll
  for (int j = 0; j < kM; ++j)
    if (lane == j && j < m) out[j] = from_acc<scalar_t>(acc[j]);
}

void check_cuda_inputs(const char* op, const at::Tensor& x, const at::Tensor& values,
                       const at::Tensor& row_ptr, const at::Tensor& col_idx,
                       const std::optional<at::Tensor>& row_order) {
  TORCH_CHECK_VALUE(x.is_cuda() && values.is_cuda() && row_ptr.is_cuda() && col_idx.is_cuda(), op,
                    ": all tensors must be on the same CUDA device");
  TORCH_CHECK_VALUE(x.device() == values.device() && row_ptr.device() == values.device() &&
                        col_idx.device() == values.device(),
                    op, ": all tensors must be on one device");
  TORCH_CHECK_TYPE(x.scalar_type() == values.scalar_type(), op, ": x has dtype ", x.scalar_type(),
                   " but values has ", values.scalar_type());
  TORCH_CHECK_TYPE(row_ptr.scalar_type() == at::kInt, op, ": row_ptr must be int32");
  TORCH_CHECK_TYPE(col_idx.scalar_type() == at::kInt || col_idx.scalar_type() == at::kShort, op,
                   ": col_idx must be int32 or int16, got ", col_idx.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 1 && row_ptr.dim() == 1 && col_idx.dim() == 1 &&
                        col_idx.numel() == values.numel() && row_ptr.numel() >= 1,
                    op, ": malformed CSR (values [nnz], row_ptr [rows+1], col_idx [nnz])");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  check_row_order(op, row_order, row_ptr);
}

template <typename scalar_t, typename index_t, bool kPerm>
void launch(const at::Tensor& xt, at::Tensor& yt, const at::Tensor& v, const int32_t* perm,
            const at::Tensor& rp, const at::Tensor& ci, const int32_t* order, int64_t n, int64_t k,
            int64_t m, bool tiled, cudaStream_t stream) {
  const dim3 block(kWarp * kWarpsPerBlock);
  const scalar_t* x = xt.data_ptr<scalar_t>();
  scalar_t* y = yt.data_ptr<scalar_t>();
  const scalar_t* vals = v.data_ptr<scalar_t>();
  const int32_t* ptr = rp.data_ptr<int32_t>();
  const index_t* cols = ci.data_ptr<index_t>();
  if (tiled && m > kSmallM) {  // the caller checked that every row's columns are sorted
    launch_tiled<scalar_t, index_t, kPerm>(x, y, vals, perm, ptr, cols, order, n, k, m, stream);
    return;
  }
  if (m <= kSmallM) {
    const dim3 grid(static_cast<unsigned>((n + kWarpsPerBlock - 1) / kWarpsPerBlock));
    // Vector loads of a whole column strip need m == kM (checked per branch) and 16-byte
    // aligned strips (strip c starts at c * m elements).
    const bool aligned = (m * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(x) % 16 == 0;
#define SK_SMALL_M(KM)                                                                              \
  csr_rows_small_m_kernel<scalar_t, index_t, kPerm, KM><<<grid, block, 0, stream>>>(                \
      x, y, vals, perm, ptr, cols, order, n, k, m, aligned && m == KM)
    if (m <= 1) SK_SMALL_M(1);
    else if (m <= 2) SK_SMALL_M(2);
    else if (m <= 4) SK_SMALL_M(4);
    else if (m <= 8) SK_SMALL_M(8);
    else if (m <= 16) SK_SMALL_M(16);
    else SK_SMALL_M(32);
#undef SK_SMALL_M
    return;
  }
  // 16-byte loads need every strip 16-byte aligned: rows of X^T are m elements apart.
  const bool vec_ok = (m * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(x) % 16 == 0;
  // The narrowest sub-warp whose strip covers M (a full warp, in strips, beyond that).
  constexpr int kVec = VecWidth<scalar_t>::value;
  const int lanes = m <= 8 * kVec ? 8 : m <= 16 * kVec ? 16 : kWarp;
  const int64_t tile = lanes * kVec;
  const int64_t rows_per_block = kWarpsPerBlock * (kWarp / lanes);
  const dim3 grid(static_cast<unsigned>((n + rows_per_block - 1) / rows_per_block),
                  static_cast<unsigned>((m + tile - 1) / tile));
  TORCH_CHECK_VALUE(grid.y <= 65535, "spmm: batch too large for one launch (", m, " rows)");
#define SK_STRIPS(LANES)                                                                              \
  csr_rows_kernel<scalar_t, index_t, kPerm, LANES><<<grid, block, 0, stream>>>(x, y, vals, perm, ptr, cols, \
                                                                              order, n, k, m, vec_ok)
  if (lanes == 8) SK_STRIPS(8);
  else if (lanes == 16) SK_STRIPS(16);
  else SK_STRIPS(kWarp);
#undef SK_STRIPS
}

// y[..., N] = x[..., K] A^T with A = CSR(values[perm or identity], row_ptr, col_idx) [N, K].
at::Tensor rows_mm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                   const at::Tensor& col_idx, const at::Tensor* perm,
                   const std::optional<at::Tensor>& row_order, int64_t k, bool tiled) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = row_ptr.numel() - 1;
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  if (m == 0 || n == 0 || values.numel() == 0 || k == 0) return at::zeros(out_shape, x.options());
  const at::Tensor xt = x.reshape({m, k}).t().contiguous();  // [K, M]
  at::Tensor yt = at::empty({n, m}, x.options());             // [N, M]
  const at::Tensor v = values.contiguous(), rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  const at::Tensor pm = perm ? perm->to(at::kInt).contiguous() : at::Tensor();
  const at::Tensor order = row_order ? row_order->contiguous() : at::Tensor();
  const int32_t* order_ptr = order.defined() ? order.data_ptr<int32_t>() : nullptr;
  const int32_t* perm_ptr = pm.defined() ? pm.data_ptr<int32_t>() : nullptr;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csr_rows_kernel", [&] {
    const bool narrow = ci.scalar_type() == at::kShort;
    // spmm_t over several strips of M: each strip would gather the values through t_perm
    // again (scattered loads); one gather up front (one pass over nnz) makes every strip's
    // value loads coalesced.
    constexpr int64_t kFullTile = kWarp * VecWidth<scalar_t>::value;
    const bool pregather = perm && m > kFullTile;
    const at::Tensor vals = pregather ? v.index_select(0, pm) : v;
    const bool gather = perm && !pregather;
    const int32_t* p = gather ? perm_ptr : nullptr;
    if (gather && narrow) launch<scalar_t, int16_t, true>(xt, yt, vals, p, rp, ci, order_ptr, n, k, m, tiled, stream);
    else if (gather) launch<scalar_t, int32_t, true>(xt, yt, vals, p, rp, ci, order_ptr, n, k, m, tiled, stream);
    else if (narrow) launch<scalar_t, int16_t, false>(xt, yt, vals, p, rp, ci, order_ptr, n, k, m, tiled, stream);
    else launch<scalar_t, int32_t, false>(xt, yt, vals, p, rp, ci, order_ptr, n, k, m, tiled, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Contiguous [..., N], as the fake implementation says (torch.compile checks strides).
  return yt.t().contiguous().view(out_shape);
}

}  // namespace

at::Tensor spmm_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                     const at::Tensor& col_idx, const std::optional<at::Tensor>& row_order, bool tiled,
                     const std::optional<at::Tensor>& bias) {
  check_cuda_inputs("spmm", x, values, row_ptr, col_idx, row_order);
  at::Tensor y = rows_mm(x, values, row_ptr, col_idx, nullptr, row_order, x.size(-1), tiled);
  if (!bias.has_value()) return y;
  TORCH_CHECK_VALUE(bias->device() == x.device() && bias->dim() == 1 && bias->size(0) == row_ptr.numel() - 1,
                    "spmm: bias must be 1-D [", row_ptr.numel() - 1, "] on ", x.device(), ", got shape ",
                    bias->sizes(), " on ", bias->device());
  TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "spmm: bias has dtype ", bias->scalar_type(),
                   " but x has dtype ", x.scalar_type());
  return y.add_(*bias);
}

at::Tensor spmm_t_cuda(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& t_row_ptr,
                       const at::Tensor& t_col_idx, const at::Tensor& t_perm,
                       const std::optional<at::Tensor>& row_order, bool tiled) {
  check_cuda_inputs("spmm_t", dy, values, t_row_ptr, t_col_idx, row_order);
  TORCH_CHECK_VALUE(t_perm.is_cuda() && t_perm.device() == values.device() && t_perm.dim() == 1 &&
                        t_perm.numel() == values.numel(),
                    "spmm_t: t_perm must be a 1-D tensor with nnz entries on the device of values");
  TORCH_CHECK_TYPE(t_perm.scalar_type() == at::kInt || t_perm.scalar_type() == at::kLong,
                   "spmm_t: t_perm must be int32 or int64, got ", t_perm.scalar_type());
  return rows_mm(dy, values, t_row_ptr, t_col_idx, &t_perm, row_order, dy.size(-1), tiled);
}

TORCH_LIBRARY_IMPL(sparsekernels_C, CUDA, m) {
  m.impl("spmm", &spmm_cuda);
  m.impl("spmm_t", &spmm_t_cuda);
}

}  // namespace sparsekernels::cuda
