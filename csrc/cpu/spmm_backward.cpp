// spmm_backward on the CPU: both gradients of y = x W^T for a CSR weight W [N, K],
//
//   dx [..., K]   = dy W                       (spmm_t, through W^T's CSR)
//   dvalues [nnz] = (dy^T x) at W's non-zeros  (sddmm)
//
// The autograd of spmm calls this when both gradients are wanted and both products run
// on the compiled CPU kernels (sparsekernels/ops/csr_matmul.py).
//
// Two ways (fused_pays chooses):
// * One sweep over W^T's rows serving both products. Row k of W^T holds the W entries
//   (o, k); per batch panel, the sweep keeps x's panel row k in registers and gathers
//   dy's panel row o once per entry, for both
//     dx^T[k]      += w[o, k] * dy^T[o]      (spmm_t's axpy)
//     dvalues[o,k] += dy^T[o] . x^T[k]       (sddmm's dot product)
//   Run apart, spmm_t and sddmm each gather one panel row per entry from L2, the cost
//   that bounds both (csr_common.h); fused, the gathers are halved. The dot products
//   come out in W^T's order and are put in W's order at the end (one random write per
//   entry, besides the values' gather into W^T's order that spmm_t also makes): O(nnz),
//   against the O(nnz x panels) of gathers saved. Each chunk of the sweep packs the x
//   rows of its own W^T rows, and dy's panels too where its entries outnumber dy's
//   columns (own_dy_panels), so the panels it gathers from are in its L2 beforehand.
// * spmm_t and sddmm, sharing one packing of dy (at SparseProp's 2048 x 768 -> 3072, 98%
//   sparse, packing the 24 MiB dy was most of each op's time), for one panel or a
//   pattern too large for the random writes to pay.
#include "csr_common.h"
#include "simd_rows.h"

#include <torch/library.h>

#include <atomic>
#include <tuple>
#include <type_traits>

namespace sparsekernels::cpu {
namespace {

constexpr int64_t kRowsPerTask = 32;  // rows of W^T per task, as spmm_t's
constexpr int kDwSlot = 4;            // workspace slot of the dot products in W^T order

// Rows [r0, r1) of W^T against panel p: block [r1 - r0, T] gets dx^T's rows, dw[e] the
// dot product of entry e (written when `first`, the batch's first panel, else added).
template <typename acc_t, int64_t T>
void fused_rows_generic(const acc_t* panel_dy, const acc_t* panel_x, acc_t* block, acc_t* dw,
                        const int32_t* t_row_ptr, const int32_t* t_col_idx, const acc_t* vt, int64_t r0,
                        int64_t r1, bool first) {
  for (int64_t k = r0; k < r1; ++k) {
    const acc_t* xk = panel_x + k * T;
    acc_t acc[T] = {};
    for (int32_t e = t_row_ptr[k]; e < t_row_ptr[k + 1]; ++e) {
      const acc_t* d = panel_dy + static_cast<int64_t>(t_col_idx[e]) * T;
      const acc_t w = vt[e];
      acc_t s = 0;
      for (int64_t j = 0; j < T; ++j) {
        acc[j] += w * d[j];
        s += d[j] * xk[j];
      }
      dw[e] = (first ? acc_t(0) : dw[e]) + s;  // 0 + s as sddmm's zeroed output: -0 becomes +0 there too
    }
    for (int64_t j = 0; j < T; ++j) block[(k - r0) * T + j] = acc[j];
  }
}


// The fp32 rows of simd_rows.inc where the CPU has them, else the portable ones.
template <typename acc_t, int64_t T>
void run_fused_rows(const acc_t* panel_dy, const acc_t* panel_x, acc_t* block, acc_t* dw, const int32_t* t_row_ptr,
                    const int32_t* t_col_idx, const acc_t* vt, int64_t r0, int64_t r1, bool first) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (with_simd_rows([&](auto rows) {
          decltype(rows)::template fused<T>(panel_dy, panel_x, block, dw, t_row_ptr, t_col_idx, vt, r0, r1, first);
        }))
      return;
  }
  fused_rows_generic<acc_t, T>(panel_dy, panel_x, block, dw, t_row_ptr, t_col_idx, vt, r0, r1, first);
}

// One parallel loop over blocks of kRowsPerTask rows of W^T; each chunk of blocks sweeps
// them against every panel in turn, so a block's dw entries are only ever written by the
// thread that owns the chunk (no races, no barrier per panel: one loop per panel cost 5-8%
// at 32 panels), and the thread's gathers read one dy panel at a time from its L2.
// False when some block's indices (W row numbers) were out of range; they are checked
// before its first panel, and such a block is skipped.
// dy's panels come packed (pdy [P, n, T]) or, where pdy is undefined, each chunk packs
// every panel of dy [M, n] itself just before sweeping it (own_dy_panels); the chunk that
// starts at block 0 then also takes the panels' column sums into dy_sums [P, n] (if given).
// x [M, K]'s panel rows of a chunk's W^T rows are always packed by the chunk.
template <typename acc_t, int64_t T>
bool fused_panels(const at::Tensor& pdy, const at::Tensor& dy, acc_t* dy_sums, const at::Tensor& x2, at::Tensor& dx,
                  const at::Tensor& vt, acc_t* dw, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx) {
  const int64_t p_count = (dy.size(0) + T - 1) / T, n = dy.size(1), k = x2.size(1);
  const int64_t blocks = (k + kRowsPerTask - 1) / kRowsPerTask;
  const acc_t* v = vt.data_ptr<acc_t>();
  const int32_t* rp = t_row_ptr.data_ptr<int32_t>();
  const int32_t* ci = t_col_idx.data_ptr<int32_t>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t k0 = begin * kRowsPerTask, k1 = std::min(k, end * kRowsPerTask);
    if (!indices_in_range(ci + rp[k0], rp[k1] - rp[k0], n)) {
      ok = false;
      return;
    }
    alignas(64) acc_t block[kRowsPerTask * T];
    ChunkPanels<acc_t, T> panels(dy, pdy);
    // x's panel rows of this chunk's W^T rows, packed by the chunk (held in registers per
    // row by the sweep; at their places in a [K, T] buffer).
    at::Tensor xown = at::empty({k * T}, dy.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* xp = xown.data_ptr<acc_t>();
    for (int64_t p = 0; p < p_count; ++p) {
      const acc_t* dyp = panels.panel(p, dy_sums != nullptr && begin == 0 ? dy_sums + p * n : nullptr);
      pack_one_panel<acc_t>(x2, T, p, xp, nullptr, k0, k1);
      for (int64_t r0 = k0; r0 < k1; r0 += kRowsPerTask) {
        const int64_t r1 = std::min(k1, r0 + kRowsPerTask);
        run_fused_rows<acc_t, T>(dyp, xp, block, dw, rp, ci, v, r0, r1, p == 0);
        store_block(block, T, r1 - r0, p, r0, dx);
      }
    }
  });
  return ok.load();
}

// out[perm[e]] = src[e]: the dot products from W^T's order into W's (perm's range was
// checked by gather_values; it is a permutation by the transpose map's contract).
template <typename acc_t>
void scatter_values(const acc_t* src, const at::Tensor& perm, at::Tensor& out) {
  const int64_t nnz = perm.numel();
  AT_DISPATCH_INDEX_TYPES(perm.scalar_type(), "scatter_values", [&] {
    const index_t* idx = perm.data_ptr<index_t>();
    acc_t* dst = out.data_ptr<acc_t>();
    at::parallel_for(0, nnz, 1 << 14, [&](int64_t b, int64_t e) {
      constexpr int64_t kAhead = 32;  // random writes: several misses in flight, as gather_values
      for (int64_t i = b; i < e; ++i) {
        if (i + kAhead < e) __builtin_prefetch(dst + idx[i + kAhead], 1);
        dst[idx[i]] = src[i];
      }
    });
  });
}

// Whether each chunk of the sweep packs dy's panels itself (fused_panels) instead of
// sweeping panels packed for all chunks beforehand. A chunk's gathers touch nearly every
// row of each dy panel when its entries outnumber those rows (nnz / chunks >= n, chunks
// as at::parallel_for forms them over W^T's row blocks); a shared packed panel then
// reaches each chunk's L2 by random first touches from L3, one miss per line per panel,
// which the gathers wait for. Packed by the chunk itself, the panel is read from dy in
// order and is in L2 before the sweep starts; the packed copy is never written back and
// read again. Each chunk packing every panel repeats the transposes per chunk (compute,
// from L1) but reads dy once per chunk, as its first touches did. Measured (Sapphire
// Rapids, 2 threads, builds alternating, backward alone): SparseProp's (2048, 768 ->
// 3072) 98% 11.0-11.5 -> 5.3-5.5 ms, (256, 4096, 4096) 90% 18.1-19.1 -> 16.8-17.7,
// (2048, 1024, 1024) 90% 8.0-8.3 -> 7.0-8.0, 11008 -> 4096 90% 65.7-65.9 -> 61.5-61.7.
bool own_dy_panels(int64_t nnz, int64_t n, int64_t k) {
  return nnz >= parallel_chunks((k + kRowsPerTask - 1) / kRowsPerTask) * n;
}

// The one-sweep way (where fused_pays): returns (dx, dvalues) or raises. dy_sums: see
// pack_panels' col_sums.
std::tuple<at::Tensor, at::Tensor> fused_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& values,
                                                  const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
                                                  const at::Tensor& t_perm, int64_t m, int64_t n, int64_t t,
                                                  at::ScalarType ct, at::Tensor* dy_sums) {
  const int64_t k = x.size(-1), nnz = values.numel();
  std::vector<int64_t> dx_shape(x.sizes().begin(), x.sizes().end());
  at::Tensor dx_out = at::empty(dx_shape, dy.options());
  at::Tensor dx = dx_out.view({m, k});
  const at::Tensor dy2 = dy.reshape({m, n});
  const at::Tensor pdy = own_dy_panels(nnz, n, k) ? at::Tensor() : pack_panels(dy2, t, ct, /*slot=*/0, dy_sums);
  const at::Tensor x2 = x.reshape({m, k});
  const at::Tensor vt = gather_values(values, t_perm, ct);
  at::Tensor dw = workspace(kDwSlot, {nnz}, ct);
  // Zeroed: t_perm is a permutation by the transpose map's contract, but one that is not
  // (a repeated entry) must leave zeros, never uninitialised memory, where nothing lands.
  at::Tensor dvalues = at::zeros({nnz}, values.options().dtype(ct));
  const at::Tensor trp = t_row_ptr.contiguous(), tci = t_col_idx.contiguous(), tp = t_perm.contiguous();
  bool ok = true;
  with_panel_width(t, [&](auto width) {
    constexpr int64_t T = decltype(width)::value;
    if (ct == at::kDouble) {
      ok = fused_panels<double, T>(pdy, dy2, dy_sums ? dy_sums->data_ptr<double>() : nullptr, x2, dx, vt,
                                   dw.data_ptr<double>(), trp, tci);
      if (ok) scatter_values(dw.data_ptr<double>(), tp, dvalues);
    } else {
      ok = fused_panels<float, T>(pdy, dy2, dy_sums ? dy_sums->data_ptr<float>() : nullptr, x2, dx, vt,
                                  dw.data_ptr<float>(), trp, tci);
      if (ok) scatter_values(dw.data_ptr<float>(), tp, dvalues);
    }
  });
  if (!ok) columns_out_of_range("spmm_t", n);
  return {dx_out, dvalues.to(values.scalar_type())};
}

// Whether the one-sweep backward beats spmm_t + sddmm for a batch of m rows in panels of
// t and nnz entries of elem bytes. It saves a panel-row gather per entry and panel and
// adds one random write per entry (the dot products into W's order), which costs more
// the further the nnz values spill out of the caches. Measured on Sapphire Rapids (2 MiB
// L2, 2 threads, fused / two-op time): wins 0.71-0.88 wherever nnz x elem <= 2 x panels
// x L2 (4096 x 4096 at 90%, B = 128..1024; 95%; 11008 -> 4096 at 90%; 1024 x 1024 at
// 50%, B = 2048; 4096 x 4096 at 80%, B = 512), even at SparseProp's 98% (0.97-0.98);
// loses beyond it (4096 x 4096: 80% at B = 128 1.05, 50% at B = 256 1.03, 50% at B = 64
// 1.34) and with one panel (B = 16 at 90%: 1.20). On AMD the panels are 32 wide, so the
// same batch has twice the panels and the rule admits twice the values; measured there
// only through the benchmark's layer steps (5.5x dense at (256, 4096, 4096) 90%).
bool fused_pays(int64_t m, int64_t t, int64_t nnz, int64_t elem) {
  const int64_t panels = (m + t - 1) / t;
  return panels >= 2 && nnz > 0 && nnz * elem <= 2 * panels * l2_cache_bytes();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spmm_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
    const at::Tensor& col_idx, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx, const at::Tensor& t_perm,
    bool bias_grad) {
  TORCH_CHECK_TYPE(at::isFloatingType(values.scalar_type()), "spmm_backward: values must be a floating dtype, got ",
                   values.scalar_type());
  TORCH_CHECK_VALUE(row_ptr.dim() == 1 && row_ptr.numel() >= 1, "spmm_backward: row_ptr must be 1-D [N + 1]");
  const int64_t n = row_ptr.numel() - 1;
  check_dense("spmm_backward", "dy", dy, values.scalar_type(), n);
  check_dense("spmm_backward", "x", x, values.scalar_type(), x.size(-1));
  check_same_batch("spmm_backward", dy, x);
  const int64_t m = leading_rows(dy), k = x.size(-1);
  // One width for both products: spmm_t gathers dy's panel rows (n of them), sddmm x's
  // (k): the panel must fit for the larger.
  const at::ScalarType ct = compute_type(dy.scalar_type());
  const int64_t t = choose_panel(m, std::max(n, k), c10::elementSize(ct));
  // The bias gradient, dy summed over the batch: per-panel column sums taken while dy is
  // packed (its tiles are in L1 then), added over the panels at the end. Saves the bias
  // gradient's own pass over dy (~1 ms of a ~28 ms layer step at SparseProp's 2048 x 3072
  // dy). Empty when not asked for.
  at::Tensor dy_sums = bias_grad ? at::empty({(m + t - 1) / t, n}, dy.options().dtype(ct)) : at::Tensor();
  at::Tensor* sums = bias_grad && m > 0 && n > 0 ? &dy_sums : nullptr;
  auto bias_out = [&]() {
    if (!bias_grad) return at::empty({0}, dy.options());
    if (sums == nullptr) return at::zeros({n}, dy.options());
    return dy_sums.sum(0).to(dy.scalar_type());
  };
  if (n > 0 && k > 0 && fused_pays(m, t, values.numel(), c10::elementSize(ct))) {
    // Both patterns are checked as the two ops check them (W's row_ptr and col_idx, W^T's
    // CSR, t_perm's range; W^T's column ranges per task), so a corrupt pattern raises the
    // same errors either way. The sweep itself reads only W^T's; that the two describe one
    // matrix is the transpose map's contract (never checked here, as by spmm_t alone).
    check_csr("spmm_backward", values, row_ptr, col_idx, n, k);
    check_transpose_map(values, t_row_ptr, t_col_idx, t_perm, k, n);
    auto [dx, dvalues] = fused_backward(dy, x, values, t_row_ptr, t_col_idx, t_perm, m, n, t, ct, sums);
    return {dx, dvalues, bias_out()};
  }
  at::Tensor pdy;
  if (m > 0 && n > 0) pdy = pack_panels(dy.reshape({m, n}), t, ct, 0, sums);
  const at::Tensor* packed = pdy.defined() ? &pdy : nullptr;
  at::Tensor dx = spmm_t_packed(dy, packed, values, t_row_ptr, t_col_idx, t_perm);
  at::Tensor dvalues = sddmm_packed(dy, packed, x, row_ptr, col_idx);
  return {dx, dvalues, bias_out()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  // (dx, dvalues, dbias) of y = x W^T (+ bias): one sweep over W^T for both products when
  // the batch spans several panels, else spmm_t and sddmm sharing one packing of dy.
  // dbias (dy summed over the batch, taken while packing dy) when bias_grad, else empty.
  m.def("spmm_backward(Tensor dy, Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor t_row_ptr, "
        "Tensor t_col_idx, Tensor t_perm, bool bias_grad=False) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparsekernels_C, CPU, m) { m.impl("spmm_backward", &spmm_backward_cpu); }

}  // namespace sparsekernels::cpu
