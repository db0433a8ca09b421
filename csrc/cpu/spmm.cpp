// spmm / spmm_t on the CPU: Y = X W^T for a CSR weight W [N, K] and a dense X [..., K].
//
// spmm_t (dX = dY W) is the same kernel run on W^T, whose CSR is the transpose map
// (t_row_ptr, t_col_idx) kept with the weight; its values are values[t_perm]. So the
// input gradient is a gather over W^T's rows, never an atomic scatter into dX.
//
// Work decomposition: X is packed into batch panels [P, K, T] (see csr_common.h); a task
// is (panel p, block of output rows). Tasks are numbered panel-major so a thread sweeps
// all its rows against one panel while that panel sits in its L2. A task computes its
// rows into a small buffer in L1 and writes them transposed into y (store_block).
#include "csr_common.h"
#include "simd_rows.h"

#include <torch/library.h>

#include <atomic>
#include <type_traits>
#include <vector>

namespace sparsekernels::cpu {
namespace {

// Rows per task: enough work (~64 * nnz/row * T FMAs) to amortise scheduling, small
// enough that two threads split even a 1024-row weight into many tasks.
constexpr int64_t kRowsPerTask = 32;

// Portable path (fp64, and fp32 on CPUs without AVX2): rows [r0, r1) into block
// [r1 - r0, T]. The fp32 kernels are simd_rows.inc's spmm.
template <typename acc_t, int64_t T>
void spmm_rows_generic(const acc_t* panel_x, acc_t* block, const int32_t* row_ptr,
                       const int32_t* col_idx, const acc_t* vals, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    acc_t acc[T] = {};
    for (int32_t e = row_ptr[r]; e < row_ptr[r + 1]; ++e) {
      const acc_t w = vals[e];
      const acc_t* x = panel_x + static_cast<int64_t>(col_idx[e]) * T;
#pragma GCC ivdep
      for (int64_t j = 0; j < T; ++j) acc[j] += w * x[j];
    }
    acc_t* y = block + (r - r0) * T;
    for (int64_t j = 0; j < T; ++j) y[j] = acc[j];
  }
}

template <typename acc_t, int64_t T>
void run_rows(const acc_t* px, acc_t* block, const int32_t* rp, const int32_t* ci, const acc_t* v,
              int64_t r0, int64_t r1) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (with_simd_rows([&](auto rows) { decltype(rows)::template spmm<T>(px, block, rp, ci, v, r0, r1); })) return;
  }
  spmm_rows_generic<acc_t, T>(px, block, rp, ci, v, r0, r1);
}

// x2 [M, K]'s panels come packed in px [P, K, T], or, where px is undefined, each chunk
// of tasks packs the panels its tasks read itself (chunks_pack_own_panels). Measured
// (Sapphire Rapids, 2 threads, builds alternating, forward alone, first call after a
// dense one / later calls, ms): SparseProp's (2048, 768 -> 3072) 98% 4.2-4.7 / 3.6-3.9
// -> 3.5-3.9 / 2.8-3.1; 11008 -> 4096 90% (B = 256) 30.5-32.8 / 31.0-31.8 -> 28.4-28.6 /
// 27.0-28.1; (256, 4096, 4096) 90% and 95% within the noise (better in 2 of 3 rounds).
// False when some task's column indices were out of range (that task was skipped).
template <typename acc_t, int64_t T>
bool spmm_panels(const at::Tensor& px, const at::Tensor& x2, at::Tensor& y, const at::Tensor& row_ptr,
                 const at::Tensor& col_idx, const at::Tensor& vals, const at::Tensor* bias) {
  const int64_t k = x2.size(1), n = y.size(1);
  const int64_t p_count = (x2.size(0) + T - 1) / T;
  const int64_t blocks = (n + kRowsPerTask - 1) / kRowsPerTask;
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  const acc_t* v = vals.data_ptr<acc_t>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, p_count * blocks, 1, [&](int64_t begin, int64_t end) {
    // Blocks whose indices this chunk of tasks has checked: a block recurs once per panel
    // (each check re-read its indices: 3.6% of a 95%-sparse (256, 4096, 4096) forward).
    std::vector<char> checked(static_cast<size_t>(blocks), 0);
    ChunkPanels<acc_t, T> panels(x2, px);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / blocks, b = task % blocks, r0 = b * kRowsPerTask;
      const int64_t r1 = std::min(n, r0 + kRowsPerTask);
      // The pattern's column check, for just the indices this task reads (check_csr).
      if (!checked[b]) {
        if (!indices_in_range(ci + rp[r0], rp[r1] - rp[r0], k)) {
          ok = false;
          continue;
        }
        checked[b] = 1;
      }
      alignas(64) acc_t block[kRowsPerTask * T];
      run_rows<acc_t, T>(panels.panel(p), block, rp, ci, v, r0, r1);
      store_block(block, T, r1 - r0, p, r0, y, bias);
    }
  });
  return ok.load();
}

// x2 [M <= kFewRowsCsr, K] (fp32 compute, a CPU with SIMD kernels) into y, for fp32 or
// bf16 values (contiguous): spmm_few, which gives the panel kernel's bits, over tasks of
// kRowsPerTask output rows. False when some task's column indices were out of range
// (that task was skipped).
bool spmm_few_rows(const at::Tensor& x2, at::Tensor& y, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                   const at::Tensor& vals, const at::Tensor* bias) {
  const int64_t m = x2.size(0), k = x2.size(1), n = y.size(1);
  at::Tensor holder;
  const float* xt = few_rows_operand(x2, /*transposed=*/true, holder);
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, (n + kRowsPerTask - 1) / kRowsPerTask, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r0 = task * kRowsPerTask, r1 = std::min(n, r0 + kRowsPerTask);
      if (!indices_in_range(ci + rp[r0], rp[r1] - rp[r0], k)) {
        ok = false;
        continue;
      }
      alignas(64) float block[kRowsPerTask * kFewRowsCsr];
      with_simd_rows([&](auto rows) {
        using Rows = decltype(rows);
        with_value_data(vals, [&](auto* v) {
          if (m == 1) Rows::template spmm_few<1>(xt, block, rp, ci, v, r0, r1);
          else Rows::template spmm_few<2>(xt, block, rp, ci, v, r0, r1);
        });
      });
      store_block(block, m, r1 - r0, 0, r0, y, bias);
    }
  });
  return ok.load();
}

}  // namespace

// out[e] = vals[perm[e]] in dtype ct (workspace slot 2). Raises where perm has an entry
// out of range; no chunk is read through one.
// perm is range-checked kCheckChunk entries (16-32 KiB) at a time just before they are
// gathered, so the gather reads them from L1: one pass over perm from memory, not two.
// In W^T order a row's next entries share its cache line, so only about one read in 16
// misses the caches; the prefetch runs kGatherAhead entries ahead to keep many of those
// misses in flight. At 32 ahead (about two misses in flight) the (256, 4096, 4096) 90%
// backward took 18.2-18.9 ms against 17.4-17.7 ms now (Sapphire Rapids, 2 threads,
// builds alternating); 128-1024 ahead measured alike.
constexpr int64_t kCheckChunk = 4096;
constexpr int64_t kGatherAhead = 256;
at::Tensor gather_values(const at::Tensor& vals, const at::Tensor& perm, at::ScalarType ct) {
  const int64_t nnz = perm.numel();
  at::Tensor out = workspace(2, {nnz}, ct);
  const at::Tensor v = vals.contiguous(), pm = perm.contiguous();
  AT_DISPATCH_INDEX_TYPES(pm.scalar_type(), "gather_values", [&] {
    const index_t* idx = pm.data_ptr<index_t>();
    std::atomic<bool> ok{true};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "gather_values", [&] {
      const scalar_t* src = v.data_ptr<scalar_t>();
      auto body = [&](auto* dst) {
        using out_t = std::remove_pointer_t<decltype(dst)>;
        at::parallel_for(0, nnz, 1 << 14, [&](int64_t b, int64_t e) {
          for (int64_t c0 = b; c0 < e; c0 += kCheckChunk) {
            const int64_t c1 = std::min(e, c0 + kCheckChunk);
            // Checked through the entries the chunk's prefetches look up as well, so no
            // prefetch address is formed from an unchecked index.
            const int64_t checked_end = std::min(e, c1 + kGatherAhead);
            index_t lo = 0, hi = 0;
            for (int64_t i = c0; i < checked_end; ++i) {
              lo = std::min(lo, idx[i]);
              hi = std::max(hi, idx[i]);
            }
            if (lo < 0 || hi >= nnz) {
              ok = false;
              return;
            }
            for (int64_t i = c0; i < c1; ++i) {
              if (i + kGatherAhead < e) __builtin_prefetch(src + idx[i + kGatherAhead]);
              dst[i] = static_cast<out_t>(src[idx[i]]);
            }
          }
        });
      };
      if (ct == at::kDouble) body(out.data_ptr<double>());
      else body(out.data_ptr<float>());
    });
    TORCH_CHECK_VALUE(ok.load(), "spmm_t: t_perm entries must lie in [0, nnz = ", nnz, ")");
  });
  return out;
}

namespace {

// Core: y[..., N] = x[..., K] @ W^T with W given by (vals, row_ptr, col_idx), N = rows.
// perm == nullptr: W's values are `vals`; else they are vals[perm] (W^T through the
// transpose map), gathered here into a workspace buffer in the compute dtype.
// The pattern was checked by check_csr(..., check_columns = false): the column range is
// checked here, per task by the kernel or in one pass where no task runs.
// bias: optional contiguous [N] of x's dtype, added to every output row as it is stored.
at::Tensor spmm_core(const char* what, const at::Tensor& x, const at::Tensor& vals, const at::Tensor& row_ptr,
                     const at::Tensor& col_idx, const at::Tensor* perm, const at::Tensor* packed = nullptr,
                     const at::Tensor* bias = nullptr) {
  const int64_t k = x.size(-1), n = row_ptr.numel() - 1;
  const int64_t m = leading_rows(x);  // not reshape(-1, k): ambiguous when k == 0
  const at::Tensor x2 = x.reshape({m, k});
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  if (m == 0 || n == 0 || vals.numel() == 0 || k == 0) {
    check_csr_columns(what, col_idx, k);
    if (m == 0 || n == 0) return at::empty(out_shape, x.options());
    at::Tensor out = at::zeros(out_shape, x.options());
    return bias ? out.add_(*bias) : out;
  }

  const at::ScalarType ct = compute_type(x.scalar_type());
  // Allocated in the output's shape and returned as is (not a view: callers may add to it
  // in place); the kernels write it as [M, N].
  at::Tensor out = at::empty(out_shape, x.options());
  at::Tensor y = out.view({m, n});
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  if (!packed && runs_few_rows(ct, m, kFewRowsCsr)) {
    const at::Tensor v = perm ? gather_values(vals, *perm, ct) : few_rows_values(vals);
    if (!spmm_few_rows(x2, y, rp, ci, v, bias)) columns_out_of_range(what, k);
    return out;
  }
  // A panel packed by the caller (spmm_backward) brings its own width.
  const int64_t t = packed ? packed->size(2) : choose_panel(m, k, c10::elementSize(ct));
  const int64_t p_count = (m + t - 1) / t, tasks = p_count * ((n + kRowsPerTask - 1) / kRowsPerTask);
  const at::Tensor px =
      packed ? *packed : (chunks_pack_own_panels(p_count, tasks) ? at::Tensor() : pack_panels(x2, t, ct, /*slot=*/0));
  const at::Tensor v = perm ? gather_values(vals, *perm, ct) : values_in(vals, ct);
  bool ok = true;
  with_panel_width(t, [&](auto width) {
    constexpr int64_t T = decltype(width)::value;
    if (ct == at::kDouble) ok = spmm_panels<double, T>(px, x2, y, rp, ci, v, bias);
    else ok = spmm_panels<float, T>(px, x2, y, rp, ci, v, bias);
  });
  if (!ok) columns_out_of_range(what, k);
  return out;
}

}  // namespace

// y[..., N] = x[..., K] W^T, W = CSR (values, row_ptr [N+1], col_idx [nnz]) of shape [N, K].
// row_order is the GPU kernels' launch order (load balance of warps); the CPU kernel
// does not use it.
at::Tensor spmm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                    const at::Tensor& col_idx, const std::optional<at::Tensor>& /*row_order*/,
                    bool /*tiled: GPU only*/, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_TYPE(at::isFloatingType(values.scalar_type()),
                   "spmm: values must be a floating dtype, got ", values.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, "spmm: x must have at least 1 dimension");
  check_dense("spmm", "x", x, values.scalar_type(), x.size(-1));
  check_csr("spmm", values, row_ptr, col_idx, row_ptr.numel() - 1, x.size(-1), /*check_columns=*/false);
  const at::Tensor b = checked_bias("spmm", bias, values.scalar_type(), row_ptr.numel() - 1);
  return spmm_core("spmm", x, values, row_ptr, col_idx, nullptr, nullptr, b.defined() ? &b : nullptr);
}

void check_transpose_map(const at::Tensor& values, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
                         const at::Tensor& t_perm, int64_t n_rows, int64_t n_cols) {
  check_csr("spmm_t", values, t_row_ptr, t_col_idx, n_rows, n_cols, /*check_columns=*/false);
  TORCH_CHECK_VALUE(t_perm.dim() == 1 && t_perm.numel() == values.numel(),
                    "spmm_t: t_perm must be 1-D with nnz = ", values.numel(), " entries, got shape ",
                    t_perm.sizes());
  TORCH_CHECK_TYPE(t_perm.scalar_type() == at::kInt || t_perm.scalar_type() == at::kLong,
                   "spmm_t: t_perm must be int32 or int64, got ", t_perm.scalar_type());
}

// dx[..., K] = dy[..., N] W, via W^T's CSR (t_row_ptr [K+1], t_col_idx [nnz] holding row
// indices of W, t_perm [nnz] positions into values).
at::Tensor spmm_t_cpu(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& t_row_ptr,
                      const at::Tensor& t_col_idx, const at::Tensor& t_perm,
                      const std::optional<at::Tensor>& /*row_order*/, bool /*tiled: GPU only*/) {
  return spmm_t_packed(dy, nullptr, values, t_row_ptr, t_col_idx, t_perm);
}

at::Tensor spmm_t_packed(const at::Tensor& dy, const at::Tensor* pdy, const at::Tensor& values,
                         const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx, const at::Tensor& t_perm) {
  TORCH_CHECK_TYPE(at::isFloatingType(values.scalar_type()),
                   "spmm_t: values must be a floating dtype, got ", values.scalar_type());
  TORCH_CHECK_VALUE(dy.dim() >= 1, "spmm_t: dy must have at least 1 dimension");
  check_dense("spmm_t", "dy", dy, values.scalar_type(), dy.size(-1));
  check_transpose_map(values, t_row_ptr, t_col_idx, t_perm, t_row_ptr.numel() - 1, dy.size(-1));
  return spmm_core("spmm_t", dy, values, t_row_ptr, t_col_idx, &t_perm, pdy);
}

TORCH_LIBRARY_IMPL(sparsekernels_C, CPU, m) {
  m.impl("spmm", &spmm_cpu);
  m.impl("spmm_t", &spmm_t_cpu);
}

}  // namespace sparsekernels::cpu
