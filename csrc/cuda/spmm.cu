// spmm / spmm_t on NVIDIA GPUs: Y = X W^T for a CSR weight W [N, K].
//
// UNVERIFIED ON A GPU: compiled in CI, never run yet (see bench/results/README.md).
//
// Layout (as Sputnik, Gale et al. 2020): the dense operand is transposed once to
// X^T [K, M], so the sparse matrix is on the left, Y^T = W X^T, and each non-zero w[n, k]
// reads one contiguous strip X^T[k, m0 : m0 + kTileM] (coalesced). One warp owns one row
// of W and one strip of M; the warp loads 32 (column, value) pairs at a time with one
// coalesced load and broadcasts them with shuffles, each lane accumulating kTileM / 32
// outputs in fp32 registers. spmm_t runs the same kernel on W^T's CSR (the transpose
// map), reading values through t_perm: a gather, no atomics.
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

namespace sparsekernels::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kTileM = 128;                  // outputs per warp along M: 4 per lane
constexpr int kPerLane = kTileM / kWarp;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type to_acc(T v) {
  return static_cast<typename Acc<T>::type>(v);
}
template <> __device__ __forceinline__ float to_acc<at::Half>(at::Half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<at::BFloat16>(at::BFloat16 v) {
  return static_cast<float>(v);
}

template <typename scalar_t, bool kPerm>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
    csr_rows_kernel(const scalar_t* __restrict__ xt, scalar_t* __restrict__ yt,
                    const scalar_t* __restrict__ vals, const int32_t* __restrict__ perm,
                    const int32_t* __restrict__ row_ptr, const int32_t* __restrict__ col_idx,
                    int64_t n_rows, int64_t n_cols, int64_t m) {
  using acc_t = typename Acc<scalar_t>::type;
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= n_rows) return;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  acc_t acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = acc_t(0);

  const int32_t start = row_ptr[row], end = row_ptr[row + 1];
  for (int32_t base = start; base < end; base += kWarp) {
    // One coalesced load of up to 32 (column, value) pairs, then broadcast by shuffles.
    const int32_t e = base + lane;
    int32_t my_col = -1;
    acc_t my_val = acc_t(0);
    if (e < end) {
      my_col = col_idx[e];
      my_val = to_acc(vals[kPerm ? perm[e] : e]);
    }
    const int count = min(kWarp, end - base);
    for (int j = 0; j < count; ++j) {
      const int32_t col = __shfl_sync(0xffffffffu, my_col, j);
      const acc_t w = __shfl_sync(0xffffffffu, my_val, j);
      if (col < 0 || col >= n_cols) continue;  // corrupt index: skip, never read out of bounds
      const scalar_t* xrow = xt + static_cast<int64_t>(col) * m + m0;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t mm = lane + i * kWarp;
        if (m0 + mm < m) acc[i] += w * to_acc(xrow[mm]);
      }
    }
  }
  scalar_t* yrow = yt + row * m + m0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t mm = lane + i * kWarp;
    if (m0 + mm < m) yrow[mm] = static_cast<scalar_t>(acc[i]);
  }
}

void check_cuda_inputs(const char* op, const at::Tensor& x, const at::Tensor& values,
                       const at::Tensor& row_ptr, const at::Tensor& col_idx) {
  TORCH_CHECK_VALUE(x.is_cuda() && values.is_cuda() && row_ptr.is_cuda() && col_idx.is_cuda(), op,
                    ": all tensors must be on the same CUDA device");
  TORCH_CHECK_VALUE(x.device() == values.device() && row_ptr.device() == values.device() &&
                        col_idx.device() == values.device(),
                    op, ": all tensors must be on one device");
  TORCH_CHECK_TYPE(x.scalar_type() == values.scalar_type(), op, ": x has dtype ", x.scalar_type(),
                   " but values has ", values.scalar_type());
  TORCH_CHECK_TYPE(row_ptr.scalar_type() == at::kInt && col_idx.scalar_type() == at::kInt, op,
                   ": row_ptr and col_idx must be int32");
  TORCH_CHECK_VALUE(values.dim() == 1 && row_ptr.dim() == 1 && col_idx.dim() == 1 &&
                        col_idx.numel() == values.numel() && row_ptr.numel() >= 1,
                    op, ": malformed CSR (values [nnz], row_ptr [rows+1], col_idx [nnz])");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
}

// y[..., N] = x[..., K] A^T with A = CSR(values[perm or identity], row_ptr, col_idx) [N, K].
at::Tensor rows_mm(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                   const at::Tensor& col_idx, const at::Tensor* perm) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t k = x.size(-1), n = row_ptr.numel() - 1;
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  if (m == 0 || n == 0 || values.numel() == 0 || k == 0) return at::zeros(out_shape, x.options());
  const at::Tensor xt = x.reshape({m, k}).t().contiguous();  // [K, M]
  at::Tensor yt = at::empty({n, m}, x.options());             // [N, M]
  const at::Tensor v = values.contiguous(), rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  const at::Tensor pm = perm ? perm->to(at::kInt).contiguous() : ci;
  const dim3 block(kWarp * kWarpsPerBlock);
  const dim3 grid(static_cast<unsigned>((n + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  static_cast<unsigned>((m + kTileM - 1) / kTileM));
  TORCH_CHECK_VALUE(grid.y <= 65535, "spmm: batch too large for one launch (", m, " rows)");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csr_rows_kernel", [&] {
    if (perm) {
      csr_rows_kernel<scalar_t, true><<<grid, block, 0, stream>>>(
          xt.data_ptr<scalar_t>(), yt.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), pm.data_ptr<int32_t>(),
          rp.data_ptr<int32_t>(), ci.data_ptr<int32_t>(), n, k, m);
    } else {
      csr_rows_kernel<scalar_t, false><<<grid, block, 0, stream>>>(
          xt.data_ptr<scalar_t>(), yt.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), nullptr,
          rp.data_ptr<int32_t>(), ci.data_ptr<int32_t>(), n, k, m);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return yt.t().reshape(out_shape);
}

}  // namespace

at::Tensor spmm_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                     const at::Tensor& col_idx) {
  check_cuda_inputs("spmm", x, values, row_ptr, col_idx);
  return rows_mm(x, values, row_ptr, col_idx, nullptr);
}

at::Tensor spmm_t_cuda(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& t_row_ptr,
                       const at::Tensor& t_col_idx, const at::Tensor& t_perm) {
  check_cuda_inputs("spmm_t", dy, values, t_row_ptr, t_col_idx);
  TORCH_CHECK_VALUE(t_perm.is_cuda() && t_perm.dim() == 1 && t_perm.numel() == values.numel(),
                    "spmm_t: t_perm must be a 1-D CUDA tensor with nnz entries");
  return rows_mm(dy, values, t_row_ptr, t_col_idx, &t_perm);
}

TORCH_LIBRARY_IMPL(sparsekernels_C, CUDA, m) {
  m.impl("spmm", &spmm_cuda);
  m.impl("spmm_t", &spmm_t_cuda);
}

}  // namespace sparsekernels::cuda
