// sddmm on the CPU: the weight gradient at the non-zeros only,
//   dvalues[e] = sum_b dy[b, row(e)] * x[b, col_idx[e]]   ( = (dy^T x) sampled at W's pattern ).
//
// Both operands are packed into batch panels (csr_common.h), so every non-zero is a
// T-wide dot product of two contiguous rows: dy's row stays in registers for the whole
// CSR row, x's row is gathered per non-zero. A thread owns a block of CSR rows and sums
// over all panels itself, so no two threads ever write the same dvalues entry.
#include "csr_common.h"
#include "simd_rows.h"

#include <torch/library.h>

#include <atomic>
#include <type_traits>

namespace sparsekernels::cpu {
namespace {

constexpr int64_t kRowsPerTask = 32;

// Portable path (fp64, and fp32 on CPUs without AVX2); the fp32 kernels are
// simd_rows.inc's sddmm.
template <typename acc_t, int64_t T>
void sddmm_rows_generic(const acc_t* panel_dy, const acc_t* panel_x, acc_t* out,
                        const int32_t* row_ptr, const int32_t* col_idx, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t* d = panel_dy + r * T;
    for (int32_t e = row_ptr[r]; e < row_ptr[r + 1]; ++e) {
      const acc_t* x = panel_x + static_cast<int64_t>(col_idx[e]) * T;
      acc_t s = 0;
      for (int64_t j = 0; j < T; ++j) s += d[j] * x[j];
      out[e] += s;
    }
  }
}

// False when some task's column indices were out of range (that task was skipped).
template <typename acc_t, int64_t T>
bool sddmm_panels(const at::Tensor& pdy, const at::Tensor& px, at::Tensor& out,
                  const at::Tensor& row_ptr, const at::Tensor& col_idx) {
  const int64_t p_count = pdy.size(0), n = pdy.size(1), k = px.size(1);
  const int64_t blocks = (n + kRowsPerTask - 1) / kRowsPerTask;
  const acc_t* dy = pdy.data_ptr<acc_t>();
  const acc_t* x = px.data_ptr<acc_t>();
  acc_t* o = out.data_ptr<acc_t>();
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t r0 = begin * kRowsPerTask, r1 = std::min(n, end * kRowsPerTask);
    // The pattern's column check, for just the indices these rows read (check_csr).
    if (!indices_in_range(ci + rp[r0], rp[r1] - rp[r0], k)) {
      ok = false;
      return;
    }
    for (int64_t p = 0; p < p_count; ++p) {
      const acc_t* pd = dy + p * n * T;
      const acc_t* pxp = x + p * k * T;
      if constexpr (std::is_same_v<acc_t, float>) {
        if (with_simd_rows([&](auto rows) { decltype(rows)::template sddmm<T>(pd, pxp, o, rp, ci, r0, r1); }))
          continue;
      }
      sddmm_rows_generic<acc_t, T>(pd, pxp, o, rp, ci, r0, r1);
    }
  });
  return ok.load();
}

}  // namespace

// dvalues[nnz] for W = CSR (row_ptr [N+1], col_idx [nnz]) of shape [N, K];
// dy [..., N], x [..., K] with the same leading dimensions. Returns dy's dtype.
at::Tensor sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                     const at::Tensor& col_idx, const std::optional<at::Tensor>& /*row_order: GPU only*/) {
  return sddmm_packed(dy, nullptr, x, row_ptr, col_idx);
}

at::Tensor sddmm_packed(const at::Tensor& dy, const at::Tensor* pdy_packed, const at::Tensor& x,
                        const at::Tensor& row_ptr, const at::Tensor& col_idx) {
  TORCH_CHECK_TYPE(at::isFloatingType(dy.scalar_type()),
                   "sddmm: dy must be a floating dtype, got ", dy.scalar_type());
  TORCH_CHECK_VALUE(dy.dim() >= 1 && x.dim() >= 1, "sddmm: dy and x must have at least 1 dimension");
  check_dense("sddmm", "x", x, dy.scalar_type(), x.size(-1));
  check_same_batch("sddmm", dy, x);
  TORCH_CHECK_VALUE(dy.device().is_cpu(), "sddmm: dy must be on the CPU, got ", dy.device());
  const int64_t n = row_ptr.numel() - 1, k = x.size(-1);
  TORCH_CHECK_VALUE(dy.size(-1) == n, "sddmm: dy must have last dimension ", n,
                    " (rows of the pattern), got shape ", dy.sizes());
  const at::Tensor placeholder = at::empty({col_idx.numel()}, dy.options());
  check_csr("sddmm", placeholder, row_ptr, col_idx, n, k, /*check_columns=*/false);

  const int64_t nnz = col_idx.numel();
  const int64_t m = leading_rows(dy);
  const at::Tensor dy2 = dy.reshape({m, n}), x2 = x.reshape({m, k});
  const at::ScalarType ct = compute_type(dy.scalar_type());
  at::Tensor out = at::zeros({nnz}, dy.options().dtype(ct));
  if (m == 0 || nnz == 0) {
    check_csr_columns("sddmm", col_idx, k);  // no task runs to check them
    return out.to(dy.scalar_type());
  }

  // The x panel is the gathered one; a dy panel packed by the caller brings its width.
  const int64_t t = pdy_packed ? pdy_packed->size(2) : choose_panel(m, k, c10::elementSize(ct));
  const at::Tensor pdy = pdy_packed ? *pdy_packed : pack_panels(dy2, t, ct, /*slot=*/0);
  const at::Tensor px = pack_panels(x2, t, ct, /*slot=*/1);
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  bool ok = true;
  with_panel_width(t, [&](auto width) {
    constexpr int64_t T = decltype(width)::value;
    if (ct == at::kDouble) ok = sddmm_panels<double, T>(pdy, px, out, rp, ci);
    else ok = sddmm_panels<float, T>(pdy, px, out, rp, ci);
  });
  if (!ok) columns_out_of_range("sddmm", k);
  return out.to(dy.scalar_type());
}

TORCH_LIBRARY_IMPL(sparsekernels_C, CPU, m) { m.impl("sddmm", &sddmm_cpu); }

}  // namespace sparsekernels::cpu
