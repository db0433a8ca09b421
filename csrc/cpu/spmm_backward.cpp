// spmm_backward on the CPU: both gradients of y = x W^T for a CSR weight W [N, K],
//
//   dx [..., K]   = dy W                       (spmm_t, through W^T's CSR)
//   dvalues [nnz] = (dy^T x) at W's non-zeros  (sddmm)
//
// with dy packed into batch panels once for both. Run as two ops, each packs dy itself:
// at SparseProp's 2048 x 768 -> 3072, 98% sparse, packing the 24 MiB dy was most of each
// op's time. The autograd of spmm calls this when both gradients are wanted and both
// products run on the compiled CPU kernels (sparsekernels/ops/csr_matmul.py).
#include "csr_common.h"

#include <torch/library.h>

#include <tuple>

namespace sparsekernels::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> spmm_backward_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                     const at::Tensor& values, const at::Tensor& row_ptr,
                                                     const at::Tensor& col_idx, const at::Tensor& t_row_ptr,
                                                     const at::Tensor& t_col_idx, const at::Tensor& t_perm) {
  TORCH_CHECK_TYPE(at::isFloatingType(values.scalar_type()), "spmm_backward: values must be a floating dtype, got ",
                   values.scalar_type());
  TORCH_CHECK_VALUE(row_ptr.dim() == 1 && row_ptr.numel() >= 1, "spmm_backward: row_ptr must be 1-D [N + 1]");
  const int64_t n = row_ptr.numel() - 1;
  check_dense("spmm_backward", "dy", dy, values.scalar_type(), n);
  check_dense("spmm_backward", "x", x, values.scalar_type(), x.size(-1));
  TORCH_CHECK_VALUE(dy.sizes().slice(0, dy.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                    "spmm_backward: dy and x must have the same leading (batch) dimensions, got ", dy.sizes(),
                    " and ", x.sizes());
  const int64_t m = leading_rows(dy);
  at::Tensor pdy;
  // One width for both products: spmm_t gathers dy's panel rows (n of them), sddmm x's
  // (x.size(-1)): the panel must fit for the larger.
  const at::ScalarType ct = compute_type(dy.scalar_type());
  if (m > 0 && n > 0)
    pdy = pack_panels(dy.reshape({m, n}), choose_panel(m, std::max(n, x.size(-1)), c10::elementSize(ct)), ct, 0);
  const at::Tensor* packed = pdy.defined() ? &pdy : nullptr;
  at::Tensor dx = spmm_t_packed(dy, packed, values, t_row_ptr, t_col_idx, t_perm);
  at::Tensor dvalues = sddmm_packed(dy, packed, x, row_ptr, col_idx);
  return {dx, dvalues};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  // (dx, dvalues) of y = x W^T: spmm_t and sddmm sharing one packing of dy.
  m.def("spmm_backward(Tensor dy, Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor t_row_ptr, "
        "Tensor t_col_idx, Tensor t_perm) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparsekernels_C, CPU, m) { m.impl("spmm_backward", &spmm_backward_cpu); }

}  // namespace sparsekernels::cpu
