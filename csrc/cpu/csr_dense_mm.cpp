// csr_dense_mm on the CPU: a CSR product run as a dense GEMM of the densified weight,
//
//   transpose = false:  y[..., N] = x[..., K] W^T      (spmm)
//   transpose = true:   y[..., K] = x[..., N] W        (spmm_t)
//
// for W [N, K] = CSR(values, row_ptr, col_idx). "auto" measures it against our sparse
// kernels (candidate "cpu:dense"): where the CPU's dense GEMM is fast enough it wins at
// moderate sparsity (bf16 on AMX: oneDNN's GEMM at (256, 4096, 4096) takes ~6 ms, our
// kernel ~12.5 ms at 90%), and the densified weight must then cost little. So W is
// written row by row in parallel (each row zeroed and filled while it sits in L1), into
// the calling thread's workspace slot kDenseSlot and never returned (the result is a
// fresh tensor). A fresh allocation per call cost more than the GEMM: its page faults
// took 9 ms for 32 MiB here (bf16 4096 x 4096). The buffer stays allocated while this
// op is in use; the Python dispatch frees the workspace after a measurement that did not
// choose "cpu:dense" (sparsekernels/ops/csr_matmul.py), so measuring alone leaves no
// dense-sized buffer behind.
//
// sparse24_dense_mm is the same for a 2:4 weight (values [N, K/2], meta [N, K/4]), whose
// rows are decompressed by expand instructions (sparse24_expand.h): 4096 x 4096 bf16
// through the CSR view's scatter took 6.4-7.7 ms, more than oneDNN's GEMM of 256 rows.
// sparse24_dense_sddmm is the weight gradient's counterpart (sparse24_backward.cpp has
// the sparse kernels): the dense GEMM dy^T x into the workspace, then its kept entries.
#include "csr_common.h"
#include "simd_ops.h"
#include "sparse24_expand.h"

#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <type_traits>

namespace sparsekernels::cpu {
namespace {

constexpr int kDenseSlot = 3;  // the other CPU ops use slots 0-2 and 4

template <typename scalar_t>
void fill_dense(scalar_t* w, const scalar_t* vals, const int32_t* rp, const int32_t* ci, int64_t rows,
                int64_t cols) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* row = w + r * cols;
      std::memset(static_cast<void*>(row), 0, sizeof(scalar_t) * cols);
      for (int32_t e = rp[r]; e < rp[r + 1]; ++e) row[ci[e]] = vals[e];
    }
  });
}

at::Tensor csr_dense_mm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                            const at::Tensor& col_idx, int64_t n_cols, bool transpose) {
  TORCH_CHECK_TYPE(at::isFloatingType(values.scalar_type()), "csr_dense_mm: values must be a floating dtype, got ",
                   values.scalar_type());
  TORCH_CHECK_VALUE(n_cols >= 0, "csr_dense_mm: n_cols must be >= 0, got ", n_cols);
  TORCH_CHECK_VALUE(row_ptr.dim() == 1 && row_ptr.numel() >= 1, "csr_dense_mm: row_ptr must be 1-D [N + 1]");
  const int64_t n_rows = row_ptr.numel() - 1;
  check_csr("csr_dense_mm", values, row_ptr, col_idx, n_rows, n_cols);
  TORCH_CHECK_VALUE(x.dim() >= 1, "csr_dense_mm: x must have at least 1 dimension");
  check_dense("csr_dense_mm", "x", x, values.scalar_type(), transpose ? n_rows : n_cols);

  at::Tensor w = workspace(kDenseSlot, {n_rows, n_cols}, values.scalar_type());
  const at::Tensor v = values.contiguous(), rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "csr_dense_mm", [&] {
    fill_dense<scalar_t>(w.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), rp.data_ptr<int32_t>(),
                         ci.data_ptr<int32_t>(), n_rows, n_cols);
  });
  return at::matmul(x, transpose ? w : w.t());
}

// The dense weight gradient dy^T x [n, k] (dy [..., n], x [..., k], checked, of one dtype)
// in the workspace: the dense sddmm variants then take their entries from it.
at::Tensor dense_weight_grad(const at::Tensor& dy, const at::Tensor& x, int64_t n, int64_t k) {
  const int64_t m = leading_rows(dy);
  at::Tensor g = workspace(kDenseSlot, {n, k}, dy.scalar_type());
  at::mm_out(g, dy.reshape({m, n}).t(), x.reshape({m, k}));
  return g;
}

// dvalues [nnz] = (dy^T x) at W's non-zeros for W = CSR(row_ptr [N + 1], col_idx) of
// shape [N, K], dy [..., N], x [..., K] (same leading dimensions), through the dense GEMM
// dy^T x (into the workspace) and a gather of the pattern's entries row by row: sddmm's
// "cpu:dense" variant, for where the CPU's dense GEMM outruns our kernel (bf16 on AMX).
at::Tensor csr_dense_sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                               const at::Tensor& col_idx) {
  TORCH_CHECK_TYPE(at::isFloatingType(dy.scalar_type()), "csr_dense_sddmm: dy must be a floating dtype, got ",
                   dy.scalar_type());
  TORCH_CHECK_VALUE(dy.dim() >= 1 && x.dim() >= 1, "csr_dense_sddmm: dy and x must have at least 1 dimension");
  TORCH_CHECK_VALUE(row_ptr.dim() == 1 && row_ptr.numel() >= 1, "csr_dense_sddmm: row_ptr must be 1-D [N + 1]");
  const int64_t n = row_ptr.numel() - 1, k = x.size(-1);
  check_dense("csr_dense_sddmm", "x", x, dy.scalar_type(), k);
  check_dense("csr_dense_sddmm", "dy", dy, dy.scalar_type(), n);
  check_same_batch("csr_dense_sddmm", dy, x);
  const at::Tensor placeholder = at::empty({col_idx.numel()}, dy.options());
  check_csr("csr_dense_sddmm", placeholder, row_ptr, col_idx, n, k);
  const at::Tensor g = dense_weight_grad(dy, x, n, k);
  at::Tensor out = at::empty({col_idx.numel()}, dy.options());
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "csr_dense_sddmm", [&] {
    const scalar_t* src = g.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int32_t* r = rp.data_ptr<int32_t>();
    const int32_t* c = ci.data_ptr<int32_t>();
    at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row)
        for (int32_t e = r[row]; e < r[row + 1]; ++e) dst[e] = src[row * k + c[e]];
    });
  });
  return out;
}

// Rows of a 2:4 weight (vals [rows, 2 * groups], meta [rows, groups]) into w [rows, 4 *
// groups]: by expand instructions where expand24_active(), group by group elsewhere and
// for the groups past the last whole vector. False when some meta byte was invalid.
template <typename scalar_t>
bool fill_dense24(scalar_t* w, const scalar_t* vals, const uint8_t* meta, int64_t rows, int64_t groups) {
  std::atomic<bool> ok{true};
  const bool simd = expand24_active();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    uint64_t bad = 0;
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* row = w + r * 4 * groups;
      const scalar_t* v = vals + r * 2 * groups;
      const uint8_t* mt = meta + r * groups;
      int64_t g = 0;
#if defined(SPARSEKERNELS_EXPAND24)
      if (simd) {
        if constexpr (sizeof(scalar_t) == 2) {
          g = groups / 8 * 8;
          bad |= expand24_row(reinterpret_cast<const uint16_t*>(v), mt, reinterpret_cast<uint16_t*>(row), g);
        } else if constexpr (std::is_same_v<scalar_t, float>) {
          g = groups / 4 * 4;
          bad |= expand24_row(v, mt, row, g);
        }
      }
#endif
      for (; g < groups; ++g) bad |= expand24_group(v + 2 * g, mt[g], row + 4 * g);
    }
    if (bad != 0) ok = false;
  });
  return ok.load();
}

// The 2:4 weight (values [N, K/2], meta [N, K/4]) decompressed into the workspace.
at::Tensor dense24_weight(const char* what, const at::Tensor& values, const at::Tensor& meta) {
  const int64_t n = values.size(0), groups = meta.size(1);
  at::Tensor w = workspace(kDenseSlot, {n, 4 * groups}, values.scalar_type());
  const at::Tensor v = values.contiguous(), mc = meta.contiguous();
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "sparse24_dense_mm", [&] {
    ok = fill_dense24<scalar_t>(w.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), mc.data_ptr<uint8_t>(), n, groups);
  });
  if (!ok) meta24_invalid(what);
  return w;
}

at::Tensor sparse24_dense_mm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                 const std::optional<at::Tensor>& bias, bool transpose) {
  check_sparse24("sparse24_dense_mm", values, meta);
  const int64_t n = values.size(0), k = 4 * meta.size(1);
  TORCH_CHECK_VALUE(x.dim() >= 1, "sparse24_dense_mm: x must have at least 1 dimension");
  check_dense("sparse24_dense_mm", "x", x, values.scalar_type(), transpose ? n : k);
  const at::Tensor b = checked_bias("sparse24_dense_mm", bias, values.scalar_type(), transpose ? k : n);
  const at::Tensor w = dense24_weight("sparse24_dense_mm", values, meta);
  if (transpose) return b.defined() ? at::matmul(x, w).add_(b) : at::matmul(x, w);
  return b.defined() ? at::linear(x, w, b) : at::linear(x, w);
}

#if defined(SPARSEKERNELS_X86_SIMD)
// A row's kept entries of its dense row src (4 * groups values) into dst (2 * groups), in
// whole vectors of groups (one permute each, as the forward's few-rows kernel picks x's
// values); returns the groups done, the rest left to the caller.
__attribute__((target("avx512f"))) int64_t pick24_row(const float* src, const uint8_t* meta, float* dst,
                                                      int64_t groups) {
  int64_t g = 0;
  for (; g + Avx512::kGroups24 <= groups; g += Avx512::kGroups24)
    _mm512_storeu_ps(dst + 2 * g, Avx512::pick24(src + 4 * g, Avx512::positions24(meta + g)));
  return g;
}
__attribute__((target("avx512f,avx512bw,avx512bf16"))) int64_t pick24_row(const uint16_t* src, const uint8_t* meta,
                                                                         uint16_t* dst, int64_t groups) {
  int64_t g = 0;
  for (; g + 16 <= groups; g += 16)
    _mm512_storeu_si512(dst + 2 * g, Avx512Bf16::pick24_words(src + 4 * g, Avx512Bf16::positions24_words(meta + g)));
  return g;
}
#endif

// pick24_row where this CPU has its permutes (fp32 at the AVX-512 level, bf16 with
// AVX512-BF16), else 0 groups: a scalar pick took 2.5 of the 9.5 ms of a (256, 4096 ->
// 4096) bf16 sparse24_dense_sddmm on Sapphire Rapids.
template <typename scalar_t>
int64_t pick24_row_simd(const scalar_t* src, const uint8_t* meta, scalar_t* dst, int64_t groups) {
#if defined(SPARSEKERNELS_X86_SIMD)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (simd_level() == SimdLevel::kAvx512) return pick24_row(src, meta, dst, groups);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (bf16_step() >= Bf16Step::kDot)
      return pick24_row(reinterpret_cast<const uint16_t*>(src), meta, reinterpret_cast<uint16_t*>(dst), groups);
  }
#endif
  return 0;
}

// dvalues [N, K/2] = (dy^T x) at the 2:4 weight's kept positions, through the dense GEMM
// dy^T x (into the workspace) and a pick of its kept entries row by row.
at::Tensor sparse24_dense_sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& values,
                                    const at::Tensor& meta) {
  check_sparse24("sparse24_dense_sddmm", values, meta);
  const int64_t n = values.size(0), groups = meta.size(1), k = 4 * groups;
  TORCH_CHECK_VALUE(dy.dim() >= 1 && x.dim() >= 1, "sparse24_dense_sddmm: dy and x must have at least 1 dimension");
  check_dense("sparse24_dense_sddmm", "dy", dy, values.scalar_type(), n);
  check_dense("sparse24_dense_sddmm", "x", x, values.scalar_type(), k);
  check_same_batch("sparse24_dense_sddmm", dy, x);
  const at::Tensor g = dense_weight_grad(dy, x, n, k);
  const at::Tensor mc = meta.contiguous();
  at::Tensor out = at::empty(values.sizes(), values.options());
  std::atomic<bool> ok{true};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "sparse24_dense_sddmm", [&] {
    const scalar_t* src = g.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const uint8_t* mt = mc.data_ptr<uint8_t>();
    at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
      if (!meta24_valid(mt + r0 * groups, (r1 - r0) * groups)) {
        ok = false;
        return;
      }
      for (int64_t r = r0; r < r1; ++r) {
        int64_t gi = pick24_row_simd(src + r * k, mt + r * groups, dst + r * 2 * groups, groups);
        for (; gi < groups; ++gi) {
          const uint8_t code = mt[r * groups + gi];
          dst[r * 2 * groups + 2 * gi] = src[r * k + 4 * gi + (code & 3)];
          dst[r * 2 * groups + 2 * gi + 1] = src[r * k + 4 * gi + ((code >> 2) & 3)];
        }
      }
    });
  });
  if (!ok.load()) meta24_invalid("sparse24_dense_sddmm");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  // y = x W^T (transpose = false, x [..., K]) or y = x W (transpose = true, x [..., N]) for
  // W [N, K = n_cols] = CSR(values, row_ptr, col_idx), through a dense GEMM.
  m.def("csr_dense_mm(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, int n_cols, bool transpose) -> Tensor");
  // dvalues [nnz] = (dy^T x) at W's non-zeros (W = CSR(row_ptr, col_idx)), through the
  // dense GEMM.
  m.def("csr_dense_sddmm(Tensor dy, Tensor x, Tensor row_ptr, Tensor col_idx) -> Tensor");
  // y = x W^T (+ bias) (transpose = false, x [..., K]) or y = x W (+ bias) (transpose =
  // true, x [..., N]) for a 2:4 weight W [N, K] = (values [N, K/2], meta [N, K/4]),
  // through a dense GEMM.
  m.def("sparse24_dense_mm(Tensor x, Tensor values, Tensor meta, Tensor? bias=None, bool transpose=False) -> Tensor");
  // dvalues [N, K/2] = (dy^T x) at the 2:4 weight's kept positions, through the dense GEMM.
  m.def("sparse24_dense_sddmm(Tensor dy, Tensor x, Tensor values, Tensor meta) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsekernels_C, CPU, m) {
  m.impl("csr_dense_mm", &csr_dense_mm_cpu);
  m.impl("csr_dense_sddmm", &csr_dense_sddmm_cpu);
  m.impl("sparse24_dense_mm", &sparse24_dense_mm_cpu);
  m.impl("sparse24_dense_sddmm", &sparse24_dense_sddmm_cpu);
}

}  // namespace sparsekernels::cpu
