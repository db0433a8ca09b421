// sddmm on NVIDIA GPUs: dvalues[e] = sum_m dy[m, row(e)] * x[m, col(e)].
//
// UNVERIFIED ON A GPU: compiled in CI, never run yet (see bench/results/README.md).
//
// Both operands are transposed once ([N, M] and [K, M]) so each non-zero is a dot
// product of two contiguous rows. One warp per row of the pattern (taken in `row_order`,
// longest rows first, as spmm): it walks the row's non-zeros kGroup at a time, so each
// element of dy^T[row, :] loaded into a register serves kGroup dot products; lanes stride
// over M with coalesced loads, accumulate in fp32 (fp64 for fp64) and reduce with
// shuffles. Every non-zero is written by exactly one warp (no atomics), and the row of a
// non-zero comes from the walk itself (no per-call row-index array).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_common.cuh"

namespace sparsekernels::cuda {
namespace {

constexpr int kSddmmWarps = 8;
constexpr int kGroup = 4;

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kWarp * kSddmmWarps)
    sddmm_rows_kernel(const scalar_t* __restrict__ dyt, const scalar_t* __restrict__ xt,
                      scalar_t* __restrict__ out, const int32_t* __restrict__ row_ptr,
                      const index_t* __restrict__ cols, const int32_t* __restrict__ row_order,
                      int64_t n, int64_t k, int64_t m) {
  using acc_t = typename Acc<scalar_t>::type;
  const int lane = threadIdx.x % kWarp;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kSddmmWarps + threadIdx.x / kWarp;
  if (slot >= n) return;  // warp-uniform
  const int64_t row = row_order ? row_order[slot] : slot;
  const scalar_t* a = dyt + row * m;
  const int32_t start = row_ptr[row], end = row_ptr[row + 1];
  for (int32_t e0 = start; e0 < end; e0 += kGroup) {
    const scalar_t* b[kGroup];
    bool live[kGroup];
#pragma unroll
    for (int q = 0; q < kGroup; ++q) {
      const int32_t c = e0 + q < end ? static_cast<int32_t>(cols[e0 + q]) : -1;
      live[q] = c >= 0 && c < k;  // corrupt or past the row: contributes 0, never read
      b[q] = xt + static_cast<int64_t>(live[q] ? c : 0) * m;
    }
    acc_t acc[kGroup];
#pragma unroll
    for (int q = 0; q < kGroup; ++q) acc[q] = acc_t(0);
    for (int64_t i = lane; i < m; i += kWarp) {
      const acc_t av = ldg_acc(a + i);
#pragma unroll
      for (int q = 0; q < kGroup; ++q)
        if (live[q]) acc[q] += av * ldg_acc(b[q] + i);
    }
#pragma unroll
    for (int q = 0; q < kGroup; ++q) {
      const acc_t total = warp_sum(acc[q]);
      if (lane == q && e0 + q < end) out[e0 + q] = from_acc<scalar_t>(total);
    }
  }
}

}  // namespace

at::Tensor sddmm_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                      const at::Tensor& col_idx, const std::optional<at::Tensor>& row_order) {
  TORCH_CHECK_VALUE(dy.is_cuda() && x.is_cuda() && row_ptr.is_cuda() && col_idx.is_cuda() &&
                        dy.device() == x.device() && row_ptr.device() == dy.device() &&
                        col_idx.device() == dy.device(),
                    "sddmm: all tensors must be on one CUDA device");
  TORCH_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), "sddmm: dy and x must share a dtype");
  TORCH_CHECK_TYPE(row_ptr.scalar_type() == at::kInt, "sddmm: row_ptr must be int32");
  TORCH_CHECK_TYPE(col_idx.scalar_type() == at::kInt || col_idx.scalar_type() == at::kShort,
                   "sddmm: col_idx must be int32 or int16, got ", col_idx.scalar_type());
  TORCH_CHECK_VALUE(dy.dim() >= 1 && x.dim() >= 1 && row_ptr.dim() == 1 && row_ptr.numel() >= 1 &&
                        col_idx.dim() == 1,
                    "sddmm: malformed inputs");
  TORCH_CHECK_VALUE(dy.sizes().slice(0, dy.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                    "sddmm: dy and x must have the same leading dimensions");
  check_row_order("sddmm", row_order, row_ptr);
  const int64_t n = row_ptr.numel() - 1, k = x.size(-1);
  TORCH_CHECK_VALUE(dy.size(-1) == n, "sddmm: dy must have last dimension ", n);
  const c10::cuda::CUDAGuard guard(dy.device());
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < dy.dim(); ++d) m *= dy.size(d);
  const int64_t nnz = col_idx.numel();
  // Zero-filled: entries past row_ptr[n] (a malformed pattern) stay 0 rather than garbage.
  at::Tensor out = at::zeros({nnz}, dy.options());
  if (nnz == 0 || m == 0 || n == 0) return out;
  const at::Tensor dyt = dy.reshape({m, n}).t().contiguous(), xt = x.reshape({m, k}).t().contiguous();
  const at::Tensor ci = col_idx.contiguous(), rp = row_ptr.contiguous();
  const at::Tensor order = row_order ? row_order->contiguous() : at::Tensor();
  const int32_t* order_ptr = order.defined() ? order.data_ptr<int32_t>() : nullptr;
  const dim3 block(kWarp * kSddmmWarps);
  const dim3 grid(static_cast<unsigned>((n + kSddmmWarps - 1) / kSddmmWarps));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "sddmm_rows_kernel", [&] {
    if (ci.scalar_type() == at::kShort) {
      sddmm_rows_kernel<scalar_t, int16_t><<<grid, block, 0, stream>>>(
          dyt.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rp.data_ptr<int32_t>(),
          ci.data_ptr<int16_t>(), order_ptr, n, k, m);
    } else {
      sddmm_rows_kernel<scalar_t, int32_t><<<grid, block, 0, stream>>>(
          dyt.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rp.data_ptr<int32_t>(),
          ci.data_ptr<int32_t>(), order_ptr, n, k, m);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(sparsekernels_C, CUDA, m) { m.impl("sddmm", &sddmm_cuda); }

}  // namespace sparsekernels::cuda
