// The transpose map of a CSR pattern by counting sort, O(nnz + rows + cols):
//
// csr_transpose(row_ptr [rows+1], col_idx [nnz], n_cols) -> (t_row_ptr [n_cols+1],
//     t_col_idx [nnz], t_perm [nnz]), all int32: W^T's CSR, its entries of each row in
//     increasing W-row order, t_perm the position in `values` of every W^T entry.
//
// Column counts, an exclusive prefix sum, then one stable pass over the entries in
// row-major order placing each at its column's cursor; row chunks in parallel. A comparison sort of the nnz
// column indices (what torch offers on the CPU) was the larger part of sparsify's time.
// The schema is defined here (a fragment of the sparsekernels_C library), next to its
// only implementation.
#include "csr_common.h"

#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace sparsekernels::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_transpose_cpu(const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                                                  int64_t n_cols) {
  TORCH_CHECK_TYPE(row_ptr.scalar_type() == at::kInt && col_idx.scalar_type() == at::kInt,
                   "csr_transpose: row_ptr and col_idx must be int32, got ", row_ptr.scalar_type(), " and ",
                   col_idx.scalar_type());
  TORCH_CHECK_VALUE(row_ptr.dim() == 1 && col_idx.dim() == 1 && row_ptr.numel() >= 1,
                    "csr_transpose: row_ptr [rows + 1] and col_idx [nnz] must be 1-D, got ", row_ptr.sizes(),
                    " and ", col_idx.sizes());
  TORCH_CHECK_VALUE(row_ptr.device().is_cpu() && col_idx.device().is_cpu(),
                    "csr_transpose: the CPU kernel needs CPU tensors");
  TORCH_CHECK_VALUE(n_cols >= 0 && n_cols < (int64_t{1} << 31), "csr_transpose: n_cols must be in [0, 2^31), got ",
                    n_cols);
  const at::Tensor rp_t = row_ptr.contiguous(), ci_t = col_idx.contiguous();
  const int32_t* rp = rp_t.data_ptr<int32_t>();
  const int32_t* ci = ci_t.data_ptr<int32_t>();
  const int64_t rows = rp_t.numel() - 1, nnz = ci_t.numel();
  TORCH_CHECK_VALUE(rp[0] == 0 && rp[rows] == nnz, "csr_transpose: row_ptr must run from 0 to nnz = ", nnz);
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK_VALUE(rp[r] <= rp[r + 1], "csr_transpose: row_ptr must be non-decreasing (row ", r, ")");

  const auto opts = ci_t.options();
  at::Tensor t_row_ptr = at::zeros({n_cols + 1}, opts);
  at::Tensor t_col_idx = at::empty({nnz}, opts);
  at::Tensor t_perm = at::empty({nnz}, opts);
  int32_t* tp = t_row_ptr.data_ptr<int32_t>();
  int32_t* tc = t_col_idx.data_ptr<int32_t>();
  int32_t* perm = t_perm.data_ptr<int32_t>();
  for (int64_t e = 0; e < nnz; ++e)
    TORCH_CHECK_VALUE(ci[e] >= 0 && ci[e] < n_cols, "csr_transpose: col_idx entries must lie in [0, ", n_cols,
                      "), got ", ci[e]);
  // Rows split into one contiguous chunk per thread: each counts its chunk's columns, the
  // counts are prefix-summed column-major (column c's entries from chunk 0, then chunk 1,
  // ...), and each chunk places its entries at its own cursors. Chunks follow row order,
  // so each W^T row still receives its W rows in increasing order.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nnz / (1 << 16)));
  std::vector<int64_t> bounds(chunks + 1);
  for (int64_t t = 0; t <= chunks; ++t) {
    // A chunk boundary at the row holding entry t * nnz / chunks: balanced by entries.
    const int64_t target = nnz * t / chunks;
    bounds[t] = std::lower_bound(rp, rp + rows + 1, static_cast<int32_t>(target)) - rp;
  }
  bounds[0] = 0;
  bounds[chunks] = rows;
  std::vector<int32_t> cursor(chunks * n_cols, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      int32_t* cnt = cursor.data() + t * n_cols;
      for (int32_t j = rp[bounds[t]]; j < rp[bounds[t + 1]]; ++j) ++cnt[ci[j]];
    }
  });
  int64_t run = 0;
  for (int64_t c = 0; c < n_cols; ++c) {
    tp[c] = static_cast<int32_t>(run);
    for (int64_t t = 0; t < chunks; ++t) {
      const int32_t count = cursor[t * n_cols + c];
      cursor[t * n_cols + c] = static_cast<int32_t>(run);
      run += count;
    }
  }
  tp[n_cols] = static_cast<int32_t>(run);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      int32_t* cur = cursor.data() + t * n_cols;
      for (int64_t r = bounds[t]; r < bounds[t + 1]; ++r) {
        for (int32_t j = rp[r]; j < rp[r + 1]; ++j) {
          const int32_t dst = cur[ci[j]]++;
          tc[dst] = static_cast<int32_t>(r);
          perm[dst] = j;
        }
      }
    }
  });
  return {t_row_ptr, t_col_idx, t_perm};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  // W^T's CSR (t_row_ptr, t_col_idx, t_perm; int32) of the pattern (row_ptr, col_idx) with
  // n_cols columns, by counting sort.
  m.def("csr_transpose(Tensor row_ptr, Tensor col_idx, int n_cols) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparsekernels_C, CPU, m) { m.impl("csr_transpose", &csr_transpose_cpu); }

}  // namespace sparsekernels::cpu
