// The new pattern of a topology update, O(nnz + g + rows) with no sort of keys:
//
// csr_merge_grow(row_ptr [rows+1], col_idx [nnz], keep [nnz] bool, grow_rows [g],
//     grow_cols [g] (int64, any order), n_cols) -> (new_row_ptr [rows+1] int32,
//     new_col_idx [nnz'] int32, source [nnz'] int64)
//
// The kept entries plus the grown positions, row-major with columns ascending in each
// row; source[i] is the old index of new entry i, or for a grown position the old index
// of that position if it was active before (dropped and regrown: it keeps its value), else
// -1. The grown positions are bucketed by row (a counting sort), each row's handful sorted,
// then each row's kept entries and grown columns are merged, rows in parallel. Torch ops
// needed two searchsorted passes, a sort of the grown keys and masked scatters over nnz
// (about 70 ms per 4096 x 4096 layer at 90% on the machines we measure on).
#include "csr_common.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <vector>

namespace sparsekernels::cpu {
namespace {

// Failure bits, OR-ed by the rows in parallel; the duplicate check is reported first.
enum Failure : int { kOk = 0, kDuplicate = 1, kActive = 2 };

std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_merge_grow_cpu(const at::Tensor& row_ptr,
                                                                  const at::Tensor& col_idx,
                                                                  const at::Tensor& keep,
                                                                  const at::Tensor& grow_rows,
                                                                  const at::Tensor& grow_cols, int64_t n_cols) {
  const int64_t rows = row_ptr.numel() - 1;
  const at::Tensor placeholder = at::empty({col_idx.numel()}, at::kFloat);
  check_csr("csr_merge_grow", placeholder, row_ptr, col_idx, rows, n_cols);
  const int64_t nnz = col_idx.numel();
  TORCH_CHECK_TYPE(keep.scalar_type() == at::kBool, "csr_merge_grow: keep must be bool, got ", keep.scalar_type());
  TORCH_CHECK_VALUE(keep.dim() == 1 && keep.numel() == nnz && keep.device().is_cpu(),
                    "csr_merge_grow: keep must be a 1-D CPU tensor of nnz = ", nnz, " entries, got shape ",
                    keep.sizes());
  TORCH_CHECK_TYPE(grow_rows.scalar_type() == at::kLong && grow_cols.scalar_type() == at::kLong,
                   "csr_merge_grow: grow_rows and grow_cols must be int64, got ", grow_rows.scalar_type(), " and ",
                   grow_cols.scalar_type());
  TORCH_CHECK_VALUE(grow_rows.dim() == 1 && grow_cols.dim() == 1 && grow_rows.numel() == grow_cols.numel() &&
                        grow_rows.device().is_cpu() && grow_cols.device().is_cpu(),
                    "csr_merge_grow: grow_rows and grow_cols must be 1-D CPU tensors of one length, got ",
                    grow_rows.sizes(), " and ", grow_cols.sizes());
  const int64_t g = grow_rows.numel();
  const at::Tensor kp_t = keep.contiguous(), gr_t = grow_rows.contiguous(), gc_t = grow_cols.contiguous();
  const at::Tensor rp_t = row_ptr.contiguous(), ci_t = col_idx.contiguous();
  const int32_t* rp = rp_t.data_ptr<int32_t>();
  const int32_t* ci = ci_t.data_ptr<int32_t>();
  const bool* kp = kp_t.data_ptr<bool>();
  const int64_t* gr = gr_t.data_ptr<int64_t>();
  const int64_t* gc = gc_t.data_ptr<int64_t>();

  // Grown positions bucketed by row: counts, exclusive prefix sum, placement.
  std::vector<int64_t> g_ptr(rows + 1, 0);
  for (int64_t i = 0; i < g; ++i) {
    TORCH_CHECK_VALUE(gr[i] >= 0 && gr[i] < rows && gc[i] >= 0 && gc[i] < n_cols,
                      "update_layer: grown position (", gr[i], ", ", gc[i], ") lies outside the ", rows, " x ",
                      n_cols, " weight");
    ++g_ptr[gr[i] + 1];
  }
  for (int64_t r = 0; r < rows; ++r) g_ptr[r + 1] += g_ptr[r];
  std::vector<int32_t> g_cols(g);
  {
    std::vector<int64_t> cursor(g_ptr.begin(), g_ptr.end() - 1);
    for (int64_t i = 0; i < g; ++i) g_cols[cursor[gr[i]]++] = static_cast<int32_t>(gc[i]);
  }

  // Row lengths of the new pattern, then its row pointers.
  at::Tensor new_rp = at::empty({rows + 1}, rp_t.options());
  int32_t* nrp = new_rp.data_ptr<int32_t>();
  nrp[0] = 0;
  at::parallel_for(0, rows, 256, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      int64_t kept = 0;
      for (int32_t j = rp[r]; j < rp[r + 1]; ++j) kept += kp[j];
      nrp[r + 1] = static_cast<int32_t>(kept + g_ptr[r + 1] - g_ptr[r]);
    }
  });
  int64_t total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    total += nrp[r + 1];
    TORCH_CHECK_VALUE(total <= INT32_MAX, "update_layer: the new nnz does not fit int32 indices");
    nrp[r + 1] = static_cast<int32_t>(total);
  }

  at::Tensor new_ci = at::empty({total}, ci_t.options());
  at::Tensor source = at::empty({total}, gr_t.options());
  int32_t* nci = new_ci.data_ptr<int32_t>();
  int64_t* src = source.data_ptr<int64_t>();
  std::atomic<int> failure{kOk};
  at::parallel_for(0, rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      int32_t* gcol = g_cols.data() + g_ptr[r];
      const int64_t ng = g_ptr[r + 1] - g_ptr[r];
      std::sort(gcol, gcol + ng);
      int64_t out = nrp[r];
      int32_t j = rp[r];
      const int32_t j_end = rp[r + 1];
      for (int64_t t = 0; t < ng; ++t) {
        const int32_t c = gcol[t];
        if (t > 0 && gcol[t - 1] == c) failure.fetch_or(kDuplicate);
        // Kept entries left of the grown column go first; dropped ones are skipped.
        for (; j < j_end && ci[j] < c; ++j) {
          if (kp[j]) {
            nci[out] = ci[j];
            src[out++] = j;
          }
        }
        int64_t from = -1;
        if (j < j_end && ci[j] == c) {  // the grown position was active before the drop
          if (kp[j]) failure.fetch_or(kActive);
          from = j++;
        }
        nci[out] = c;
        src[out++] = from;
      }
      for (; j < j_end; ++j) {
        if (kp[j]) {
          nci[out] = ci[j];
          src[out++] = j;
        }
      }
    }
  });
  TORCH_CHECK_VALUE(!(failure.load() & kDuplicate), "update_layer: grown positions must be distinct");
  TORCH_CHECK_VALUE(!(failure.load() & kActive), "update_layer: a grown position is already active");
  return {new_rp, new_ci, source};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  // The pattern (row_ptr, col_idx; int32) of the entries kept by `keep` plus the grown
  // positions (grow_rows, grow_cols; int64, any order), and source (int64): the old index
  // of every new entry, -1 for a position that was not active before.
  m.def("csr_merge_grow(Tensor row_ptr, Tensor col_idx, Tensor keep, Tensor grow_rows, Tensor grow_cols, "
        "int n_cols) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparsekernels_C, CPU, m) { m.impl("csr_merge_grow", &csr_merge_grow_cpu); }

}  // namespace sparsekernels::cpu
