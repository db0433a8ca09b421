// 2:4 prune + compress on NVIDIA GPUs, one pass: the same contract as the CPU kernel
// (csrc/cpu/sparse24_compress.cpp): (values [N, K/2], meta [N, K/4] uint8, mask [N, K]).
//
// UNVERIFIED ON A GPU: compiled in CI, never run yet (see bench/results/README.md).
//
// Plain 2:4: one thread per group of 4 (coalesced along the row). Transposable: one thread
// per aligned 4x4 tile scores the 90 patterns with two per row and column (table in
// constant memory, same order as the CPU kernel and the Python definition; first wins ties).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

namespace sparsekernels::cuda {
namespace {

__constant__ uint8_t kTilePatterns[90][4];
// Constant memory is per device: upload the table once for each device used.
void upload_patterns(int device) {
  static bool done[64] = {};
  if (device >= 0 && device < 64 && done[device]) return;
  const uint8_t pairs[6] = {0b0011, 0b0101, 0b1001, 0b0110, 0b1010, 0b1100};
  uint8_t table[90][4];
  int count = 0;
  for (uint8_t a : pairs)
    for (uint8_t b : pairs)
      for (uint8_t c : pairs)
        for (uint8_t d : pairs) {
          bool ok = true;
          for (int col = 0; col < 4; ++col)
            ok &= (((a >> col) & 1) + ((b >> col) & 1) + ((c >> col) & 1) + ((d >> col) & 1)) == 2;
          if (ok && count < 90) {
            table[count][0] = a, table[count][1] = b, table[count][2] = c, table[count][3] = d;
            ++count;
          }
        }
  TORCH_CHECK(count == 90, "sparse24_compress: expected 90 transposable patterns, found ", count);
  C10_CUDA_CHECK(cudaMemcpyToSymbol(kTilePatterns, table, sizeof(table)));
  if (device >= 0 && device < 64) done[device] = true;
}

// |w| in double, as the CPU kernel scores tiles: the same sums, so the same pattern wins
// near-ties on both devices (float sums could round two candidates together).
template <typename scalar_t>
__device__ __forceinline__ double mag(scalar_t v) {
  return fabs(static_cast<double>(v));
}

// Selection key of a weight, as the CPU kernel's rank_key: |w| with every NaN above +inf
// and all NaNs equal (the order documented in sparsekernels/formats/sparse24.py). The
// unsigned order of a non-negative float's bits is its magnitude order; NaN patterns lie
// above +inf's and are clamped to one value so they tie. fp64 keys on its own bits.
template <typename scalar_t>
__device__ __forceinline__ uint32_t rank_key(scalar_t v) {
  const uint32_t u = __float_as_uint(static_cast<float>(v)) & 0x7fffffffu;
  return u > 0x7f800000u ? 0xffffffffu : u;
}

__device__ __forceinline__ unsigned long long rank_key64(double v) {
  const unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(v)) & 0x7fffffffffffffffull;
  return u > 0x7ff0000000000000ull ? ~0ull : u;
}

template <typename scalar_t>
__device__ __forceinline__ auto group_key(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return rank_key64(v);
  } else {
    return rank_key(v);
  }
}

template <typename scalar_t>
__device__ __forceinline__ void write_group(const scalar_t* w, scalar_t* vals, uint8_t* meta, bool* mask, int64_t g,
                                            uint8_t bits) {
  int slot = 0, pos[2] = {0, 0};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const bool keep = (bits >> j) & 1;
    mask[4 * g + j] = keep;
    if (keep && slot < 2) pos[slot++] = j;
  }
  vals[2 * g] = w[4 * g + pos[0]];
  vals[2 * g + 1] = w[4 * g + pos[1]];
  meta[g] = static_cast<uint8_t>(pos[0] | (pos[1] << 2));
}

template <typename scalar_t>
__global__ void compress_groups_kernel(const scalar_t* __restrict__ w, scalar_t* __restrict__ vals,
                                       uint8_t* __restrict__ meta, bool* __restrict__ mask, int64_t groups) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  // Keys, not float magnitudes: a NaN compares false both ways and was never kept.
  decltype(group_key(w[0])) a[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) a[j] = group_key(w[4 * g + j]);
  // Strict > : the earlier position wins ties (first = earliest maximum).
  int first = 0;
#pragma unroll
  for (int j = 1; j < 4; ++j)
    if (a[j] > a[first]) first = j;
  int second = first == 0 ? 1 : 0;
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (j != first && a[j] > a[second]) second = j;
  write_group(w, vals, meta, mask, g, static_cast<uint8_t>((1u << first) | (1u << second)));
}

template <typename scalar_t>
__global__ void compress_tiles_kernel(const scalar_t* __restrict__ w, scalar_t* __restrict__ vals,
                                      uint8_t* __restrict__ meta, bool* __restrict__ mask, int64_t n, int64_t k) {
  const int64_t tiles_per_row = k / 4;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= (n / 4) * tiles_per_row) return;
  const int64_t tr = t / tiles_per_row, tc = t % tiles_per_row;
  double a[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) a[i][j] = mag(w[(4 * tr + i) * k + 4 * tc + j]);
  int best = 0;
  double best_score = -1.0;
  for (int p = 0; p < 90; ++p) {
    double s = 0.0;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if ((kTilePatterns[p][i] >> j) & 1) s += a[i][j];
    // First pattern wins ties; a sum holding a NaN beats every number (s != s: NaN test
    // that --use_fast_math keeps, it does not assume finite math).
    if (s > best_score || (s != s && best_score == best_score)) best_score = s, best = p;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = 4 * tr + i;
    write_group(w + row * k, vals + row * (k / 2), meta + row * (k / 4), mask + row * k, tc, kTilePatterns[best][i]);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse24_compress_cuda(const at::Tensor& weight, bool transposable) {
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()), "sparse24_compress: weight must be a floating dtype");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) % 4 == 0,
                    "sparse24_compress: weight must be [N, K] with K divisible by 4, got ", weight.sizes());
  TORCH_CHECK_VALUE(!transposable || weight.size(0) % 4 == 0,
                    "sparse24_compress: transposable 2:4 needs N divisible by 4, got ", weight.size(0));
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  at::Tensor vals = at::empty({n, k / 2}, w.options());
  at::Tensor meta = at::empty({n, k / 4}, w.options().dtype(at::kByte));
  at::Tensor mask = at::empty({n, k}, w.options().dtype(at::kBool));
  if (w.numel() == 0) return {vals, meta, mask};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "sparse24_compress", [&] {
    if (transposable) {
      upload_patterns(w.get_device());
      const int64_t tiles = (n / 4) * (k / 4);
      compress_tiles_kernel<scalar_t><<<(tiles + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
          w.data_ptr<scalar_t>(), vals.data_ptr<scalar_t>(), meta.data_ptr<uint8_t>(), mask.data_ptr<bool>(), n, k);
    } else {
      const int64_t groups = n * k / 4;
      compress_groups_kernel<scalar_t><<<(groups + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
          w.data_ptr<scalar_t>(), vals.data_ptr<scalar_t>(), meta.data_ptr<uint8_t>(), mask.data_ptr<bool>(), groups);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {vals, meta, mask};
}

TORCH_LIBRARY_IMPL(sparsekernels_C, CUDA, m) { m.impl("sparse24_compress", &sparse24_compress_cuda); }

}  // namespace sparsekernels::cuda
