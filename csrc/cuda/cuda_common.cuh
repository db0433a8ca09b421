// Helpers shared by the CUDA kernels: accumulator types, loads that widen to the
// accumulator, 16-byte vector loads, warp reductions and the row-order check.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <optional>

namespace sparsekernels::cuda {

constexpr int kWarp = 32;

// fp32 accumulation for fp32 / fp16 / bf16, fp64 for fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type to_acc(T v) {
  return static_cast<typename Acc<T>::type>(v);
}
template <> __device__ __forceinline__ float to_acc<at::Half>(at::Half v) {
  return __half2float(static_cast<__half>(v));
}
template <> __device__ __forceinline__ float to_acc<at::BFloat16>(at::BFloat16 v) {
  return static_cast<float>(v);
}

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) {
  return static_cast<T>(v);
}

// One element through the read-only data cache, widened to the accumulator type.
template <typename T> __device__ __forceinline__ typename Acc<T>::type ldg_acc(const T* p) {
  return __ldg(p);
}
template <> __device__ __forceinline__ float ldg_acc<at::Half>(const at::Half* p) {
  return __half2float(__ldg(reinterpret_cast<const __half*>(p)));
}
template <> __device__ __forceinline__ float ldg_acc<at::BFloat16>(const at::BFloat16* p) {
  return __bfloat162float(__ldg(reinterpret_cast<const __nv_bfloat16*>(p)));
}

// Elements per 16-byte vector load.
template <typename T> struct VecWidth { static constexpr int value = 16 / static_cast<int>(sizeof(T)); };

// kVec consecutive elements from a 16-byte aligned address with one load, widened.
template <typename T, int kVec>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, typename Acc<T>::type (&out)[kVec]) {
  static_assert(kVec * sizeof(T) == 16, "load_vec reads exactly 16 bytes");
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  T elems[kVec];
  memcpy(elems, &raw, 16);  // no aliasing games: the compiler keeps this in registers
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = to_acc(elems[i]);
}

// The same from shared memory (16-byte aligned).
template <typename T, int kVec>
__device__ __forceinline__ void load_vec_shared(const T* p, typename Acc<T>::type (&out)[kVec]) {
  static_assert(kVec * sizeof(T) == 16, "load_vec_shared reads exactly 16 bytes");
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  T elems[kVec];
  memcpy(elems, &raw, 16);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = to_acc(elems[i]);
}

// Sum over the warp; every lane gets the result (butterfly).
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// row_order (optional): int32 [rows], a permutation of the rows (the launch order).
inline void check_row_order(const char* op, const std::optional<at::Tensor>& row_order,
                            const at::Tensor& row_ptr) {
  if (!row_order) return;
  TORCH_CHECK_VALUE(row_order->is_cuda() && row_order->device() == row_ptr.device(), op,
                    ": row_order must be on the device of row_ptr");
  TORCH_CHECK_TYPE(row_order->scalar_type() == at::kInt, op, ": row_order must be int32");
  TORCH_CHECK_VALUE(row_order->dim() == 1 && row_order->numel() == row_ptr.numel() - 1, op,
                    ": row_order must hold one entry per row (", row_ptr.numel() - 1, ")");
}

}  // namespace sparsekernels::cuda
