// sddmm on NVIDIA GPUs: dvalues[e] = sum_m dy[m, row(e)] * x[m, col(e)].
//
// UNVERIFIED ON A GPU: compiled in CI, never run yet (see bench/results/README.md).
//
// Both operands are transposed once ([N, M] and [K, M]) so each non-zero is a dot
// product of two contiguous rows. One warp per non-zero: lanes stride over M with
// coalesced loads, accumulate in fp32 (fp64 for fp64) and reduce with shuffles. Every
// non-zero is written by exactly one warp (no atomics).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

namespace sparsekernels::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

template <typename T> struct SddmmAcc { using type = float; };
template <> struct SddmmAcc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename SddmmAcc<T>::type load_acc(const T* p) {
  return static_cast<typename SddmmAcc<T>::type>(*p);
}
template <> __device__ __forceinline__ float load_acc<at::Half>(const at::Half* p) {
  return __half2float(*reinterpret_cast<const __half*>(p));
}
template <> __device__ __forceinline__ float load_acc<at::BFloat16>(const at::BFloat16* p) {
  return static_cast<float>(*p);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock)
    sddmm_kernel(const scalar_t* __restrict__ dyt, const scalar_t* __restrict__ xt,
                 scalar_t* __restrict__ out, const int64_t* __restrict__ rows,
                 const int32_t* __restrict__ cols, int64_t nnz, int64_t n, int64_t k, int64_t m) {
  using acc_t = typename SddmmAcc<scalar_t>::type;
  const int lane = threadIdx.x % kWarp;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (e >= nnz) return;
  const int64_t r = rows[e];
  const int32_t c = cols[e];
  acc_t acc = acc_t(0);
  if (r >= 0 && r < n && c >= 0 && c < k) {  // corrupt index: leave 0, never read out of bounds
    const scalar_t* a = dyt + r * m;
    const scalar_t* b = xt + static_cast<int64_t>(c) * m;
    for (int64_t i = lane; i < m; i += kWarp) acc += load_acc(a + i) * load_acc(b + i);
  }
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) out[e] = static_cast<scalar_t>(acc);
}

}  // namespace

at::Tensor sddmm_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                      const at::Tensor& col_idx) {
  TORCH_CHECK_VALUE(dy.is_cuda() && x.is_cuda() && row_ptr.is_cuda() && col_idx.is_cuda() &&
                        dy.device() == x.device(),
                    "sddmm: all tensors must be on one CUDA device");
  TORCH_CHECK_TYPE(dy.scalar_type() == x.scalar_type(), "sddmm: dy and x must share a dtype");
  TORCH_CHECK_TYPE(row_ptr.scalar_type() == at::kInt && col_idx.scalar_type() == at::kInt,
                   "sddmm: row_ptr and col_idx must be int32");
  TORCH_CHECK_VALUE(dy.dim() >= 1 && x.dim() >= 1 && row_ptr.dim() == 1 && row_ptr.numel() >= 1 &&
                        col_idx.dim() == 1,
                    "sddmm: malformed inputs");
  TORCH_CHECK_VALUE(dy.sizes().slice(0, dy.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                    "sddmm: dy and x must have the same leading dimensions");
  const int64_t n = row_ptr.numel() - 1, k = x.size(-1);
  TORCH_CHECK_VALUE(dy.size(-1) == n, "sddmm: dy must have last dimension ", n);
  const c10::cuda::CUDAGuard guard(dy.device());
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < dy.dim(); ++d) m *= dy.size(d);
  const int64_t nnz = col_idx.numel();
  at::Tensor out = at::zeros({nnz}, dy.options());
  if (nnz == 0 || m == 0) return out;
  const at::Tensor dyt = dy.reshape({m, n}).t().contiguous(), xt = x.reshape({m, k}).t().contiguous();
  // Row of every non-zero (O(nnz), on the device, no host sync).
  const at::Tensor counts = row_ptr.narrow(0, 1, n) - row_ptr.narrow(0, 0, n);
  const at::Tensor rows = at::repeat_interleave(at::arange(n, row_ptr.options().dtype(at::kLong)),
                                                counts.to(at::kLong), std::nullopt, nnz);
  const at::Tensor ci = col_idx.contiguous();
  const dim3 block(kWarp * kWarpsPerBlock);
  const dim3 grid(static_cast<unsigned>((nnz + kWarpsPerBlock - 1) / kWarpsPerBlock));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "sddmm_kernel", [&] {
    sddmm_kernel<scalar_t><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
        dyt.data_ptr<scalar_t>(), xt.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(),
        ci.data_ptr<int32_t>(), nnz, n, k, m);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(sparsekernels_C, CUDA, m) { m.impl("sddmm", &sddmm_cuda); }

}  // namespace sparsekernels::cuda
