// sparse24_mm on NVIDIA GPUs for small batches: y [M, N] = x [M, K] W^T (+ bias) for a 2:4
// weight W [N, K] stored as values [N, K/2] + meta [N, K/4] (uint8: positions i0 | i1 << 2
// of the two kept weights of each group of 4), M <= kMaxM rows.
//
// UNVERIFIED ON A GPU: compiled in CI, never run yet (see bench/results/README.md).
//
// Why: at a few rows the product is a matrix-vector product and its time is the weight's
// bytes. torch's semi-structured GEMM pads x to its tile and was measured at 0.63 ms for
// one row of 4096 -> 4096 bf16 on the H200 against 0.035 ms for cuBLAS; densifying the
// weight per call (what the layer did below 256 rows) 0.49 ms. Here the compressed form is
// read once: 1.25 bytes per weight position in bf16 (values + meta) against dense's 2.
//
// One warp per output row: lanes take consecutive groups of 4 columns (so a warp's loads
// of values, two per group, and of meta, one byte per group, are coalesced), each lane
// keeps the kM partial sums of its groups in fp32 registers (fp64 for fp64), reading
// x[j, 4g + i] through the read-only cache (x is at most kMaxM x K: it stays in L1 / L2);
// the warp then reduces the sums with shuffles and lane j writes y[j, row] (+ bias).
// Every output is the sum of its row's terms in a fixed order, whatever the launch.
// A position byte outside 0..3 is masked to its group: never a read outside x's row.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_common.cuh"

namespace sparsekernels::cuda {
namespace {

constexpr int kRowsPerBlock = 4;  // warps per block, one row each
constexpr int64_t kMaxM = 32;

template <typename scalar_t, int kM>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock)
    sparse24_small_m_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                            const scalar_t* __restrict__ vals, const uint8_t* __restrict__ meta,
                            const scalar_t* __restrict__ bias, int64_t n, int64_t groups, int64_t m) {
  using acc_t = typename Acc<scalar_t>::type;
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= n) return;  // warp-uniform
  const int64_t k = 4 * groups;
  const scalar_t* v = vals + row * 2 * groups;
  const uint8_t* mt = meta + row * groups;
  acc_t acc[kM];
#pragma unroll
  for (int j = 0; j < kM; ++j) acc[j] = acc_t(0);
#pragma unroll 4
  for (int64_t g = lane; g < groups; g += kWarp) {
    const acc_t w0 = ldg_acc(v + 2 * g), w1 = ldg_acc(v + 2 * g + 1);
    const uint8_t pos = __ldg(mt + g);
    const int64_t c0 = 4 * g + (pos & 3), c1 = 4 * g + ((pos >> 2) & 3);
#pragma unroll
    for (int j = 0; j < kM; ++j)
      if (j < m) acc[j] += w0 * ldg_acc(x + j * k + c0) + w1 * ldg_acc(x + j * k + c1);
  }
#pragma unroll
  for (int j = 0; j < kM; ++j) acc[j] = warp_sum(acc[j]);  // every lane holds every sum
  const acc_t b = bias ? ldg_acc(bias + row) : acc_t(0);
#pragma unroll
  for (int j = 0; j < kM; ++j)
    if (lane == j && j < m) y[j * n + row] = from_acc<scalar_t>(acc[j] + b);
}

// The kernel instance whose register tile kM covers m rows (1, 2, 4, 8, 16 or 32).
template <typename scalar_t>
void launch_small_m(const scalar_t* x, scalar_t* y, const scalar_t* vals, const uint8_t* meta, const scalar_t* bias,
                    int64_t n, int64_t groups, int64_t m, cudaStream_t stream) {
  const dim3 block(kWarp * kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>((n + kRowsPerBlock - 1) / kRowsPerBlock));
  if (m <= 1) sparse24_small_m_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(x, y, vals, meta, bias, n, groups, m);
  else if (m <= 2) sparse24_small_m_kernel<scalar_t, 2><<<grid, block, 0, stream>>>(x, y, vals, meta, bias, n, groups, m);
  else if (m <= 4) sparse24_small_m_kernel<scalar_t, 4><<<grid, block, 0, stream>>>(x, y, vals, meta, bias, n, groups, m);
  else if (m <= 8) sparse24_small_m_kernel<scalar_t, 8><<<grid, block, 0, stream>>>(x, y, vals, meta, bias, n, groups, m);
  else if (m <= 16) sparse24_small_m_kernel<scalar_t, 16><<<grid, block, 0, stream>>>(x, y, vals, meta, bias, n, groups, m);
  else sparse24_small_m_kernel<scalar_t, 32><<<grid, block, 0, stream>>>(x, y, vals, meta, bias, n, groups, m);
}

at::Tensor sparse24_mm_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                            const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.is_cuda() && values.is_cuda() && meta.is_cuda() && x.device() == values.device() &&
                        meta.device() == values.device(),
                    "sparse24_mm: x, values and meta must be on one CUDA device");
  TORCH_CHECK_TYPE(x.scalar_type() == values.scalar_type(), "sparse24_mm: x has dtype ", x.scalar_type(),
                   " but values has ", values.scalar_type());
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kByte, "sparse24_mm: meta must be uint8, got ", meta.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 2 && meta.dim() == 2 && values.size(0) == meta.size(0) &&
                        values.size(1) == 2 * meta.size(1),
                    "sparse24_mm: values [N, K/2] and meta [N, K/4] do not match: ", values.sizes(), " and ",
                    meta.sizes());
  const int64_t n = values.size(0), groups = meta.size(1), k = 4 * groups;
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == k, "sparse24_mm: x must have shape [..., ", k, "], got ",
                    x.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->device() == x.device() && bias->dim() == 1 && bias->size(0) == n,
                      "sparse24_mm: bias must be 1-D [", n, "] on ", x.device(), ", got shape ", bias->sizes(),
                      " on ", bias->device());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "sparse24_mm: bias has dtype ", bias->scalar_type(),
                     " but x has dtype ", x.scalar_type());
  }
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  TORCH_CHECK_VALUE(k == 0 || m <= kMaxM, "sparse24_mm: the CUDA kernel takes at most ", kMaxM,
                    " rows of x (larger batches run on sparse tensor cores or dense), got ", m);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  const c10::cuda::CUDAGuard guard(x.device());
  if (m == 0 || n == 0 || k == 0) {
    at::Tensor y = at::zeros(out_shape, x.options());
    return bias.has_value() ? y.add_(*bias) : y;  // k == 0: the bias alone
  }
  const at::Tensor x2 = x.reshape({m, k}).contiguous();
  const at::Tensor v = values.contiguous(), mt = meta.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({m, n}, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse24_small_m_kernel", [&] {
    launch_small_m<scalar_t>(x2.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             mt.data_ptr<uint8_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr, n, groups, m,
                             stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekernels_C, CUDA, m) { m.impl("sparse24_mm", &sparse24_mm_cuda); }

}  // namespace sparsekernels::cuda
