// topk_grow on the CPU: the k inactive positions of W [N, K] with the largest |dL/dW|,
// where dL/dW = dy^T x (dy [M, N], x [M, K]), without ever holding the dense [N, K]
// gradient (RigL's grow step).
//
// The gradient is formed one tile of output rows at a time (a BLAS GEMM of
// [rows_per_tile, M] x [M, K]), the active positions of those rows are knocked out, the
// tile's best k are selected and merged into a running best-k. Extra memory is one tile
// plus 2k candidates.
#include "csr_common.h"

#include <torch/library.h>

#include <tuple>

namespace sparsekernels::cpu {

namespace {

// Permutation sorting candidates by score (descending), equal scores by flat position
// (ascending): the one order every backend and the masked-dense reference agree on.
at::Tensor by_score_then_position(const at::Tensor& scores, const at::Tensor& flat) {
  const at::Tensor by_pos = at::argsort(flat);
  const at::Tensor by_score =
      std::get<1>(at::sort(scores.index_select(0, by_pos), /*stable=*/true, /*dim=*/0, /*descending=*/true));
  return by_pos.index_select(0, by_score);
}

// The `take` best entries of a flat score tile in that order. topk alone picks an
// arbitrary subset of the entries tied at the cut-off; the tie is resolved here by
// position so the answer does not depend on the tiling.
std::pair<at::Tensor, at::Tensor> tile_best(const at::Tensor& g, int64_t take) {
  auto [scores, idx] = at::topk(g, take, 0, /*largest=*/true, /*sorted=*/false);
  if (take == 0) return {idx, scores};
  const at::Tensor cut = scores.min();
  const at::Tensor above = idx.masked_select(scores > cut);
  const at::Tensor tied = at::nonzero(g == cut).view({-1});  // ascending positions
  const at::Tensor flat = at::cat({above, tied.narrow(0, 0, take - above.numel())});
  return {flat, g.index_select(0, flat)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_grow_cpu(const at::Tensor& dy,
                                                             const at::Tensor& x,
                                                             const at::Tensor& row_ptr,
                                                             const at::Tensor& col_idx, int64_t k,
                                                             int64_t tile_elems) {
  TORCH_CHECK_TYPE(at::isFloatingType(dy.scalar_type()), "topk_grow: dy must be a floating dtype, got ",
                   dy.scalar_type());
  TORCH_CHECK_VALUE(dy.dim() == 2 && x.dim() == 2, "topk_grow: dy and x must be 2-D [M, N] and [M, K], got ",
                    dy.sizes(), " and ", x.sizes());
  check_dense("topk_grow", "x", x, dy.scalar_type(), x.size(-1));
  TORCH_CHECK_VALUE(dy.device().is_cpu(), "topk_grow: dy must be on the CPU");
  TORCH_CHECK_VALUE(dy.size(0) == x.size(0), "topk_grow: dy and x must have the same number of rows, got ",
                    dy.size(0), " and ", x.size(0));
  const int64_t n = dy.size(1), kk = x.size(1);
  const at::Tensor placeholder = at::empty({col_idx.numel()}, dy.options());
  check_csr("topk_grow", placeholder, row_ptr, col_idx, n, kk);
  const int64_t inactive = n * kk - col_idx.numel();
  TORCH_CHECK_VALUE(k >= 0 && k <= inactive, "topk_grow: k must be in [0, inactive positions = ", inactive,
                    "], got ", k);
  TORCH_CHECK_VALUE(tile_elems > 0, "topk_grow: tile_elems must be positive, got ", tile_elems);

  const auto long_opts = dy.options().dtype(at::kLong);
  // Scores are computed in fp32 at least (fp64 stays fp64) so bf16 inputs rank correctly.
  const at::ScalarType ct = compute_type(dy.scalar_type());
  at::Tensor best_scores = at::empty({0}, dy.options().dtype(ct));
  at::Tensor best_flat = at::empty({0}, long_opts);
  if (k == 0 || n == 0 || kk == 0) {
    return {best_flat, best_flat.clone(), best_scores.to(dy.scalar_type())};
  }
  const at::Tensor dyc = dy.to(ct), xc = x.to(ct).contiguous();
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  const int32_t* r = rp.data_ptr<int32_t>();
  const int32_t* c = ci.data_ptr<int32_t>();
  const int64_t rows_per_tile = std::max<int64_t>(1, std::min<int64_t>(n, tile_elems / std::max<int64_t>(kk, 1)));

  for (int64_t o0 = 0; o0 < n; o0 += rows_per_tile) {
    const int64_t o1 = std::min(n, o0 + rows_per_tile), rows = o1 - o0;
    at::Tensor g = at::mm(dyc.narrow(1, o0, rows).t(), xc).abs_();  // [rows, K]
    // Knock out the active positions: |grad| >= 0, so -1 never beats an inactive one.
    AT_DISPATCH_FLOATING_TYPES(ct, "topk_grow_mask", [&] {
      scalar_t* gp = g.data_ptr<scalar_t>();
      at::parallel_for(o0, o1, 64, [&](int64_t b, int64_t e) {
        for (int64_t row = b; row < e; ++row)
          for (int32_t j = r[row]; j < r[row + 1]; ++j) gp[(row - o0) * kk + c[j]] = scalar_t(-1);
      });
    });
    const int64_t take = std::min<int64_t>(k, rows * kk);
    auto [tile_flat, tile_scores] = tile_best(g.view({-1}), take);
    tile_flat.add_(o0 * kk);
    if (best_scores.numel() == 0) {
      best_scores = tile_scores;
      best_flat = tile_flat;
    } else {
      at::Tensor order = by_score_then_position(at::cat({best_scores, tile_scores}), at::cat({best_flat, tile_flat}));
      order = order.narrow(0, 0, std::min<int64_t>(k, order.numel()));
      best_scores = at::cat({best_scores, tile_scores}).index_select(0, order);
      best_flat = at::cat({best_flat, tile_flat}).index_select(0, order);
    }
  }
  const at::Tensor order = by_score_then_position(best_scores, best_flat);
  best_flat = best_flat.index_select(0, order);
  best_scores = best_scores.index_select(0, order);
  return {at::div(best_flat, kk, "floor"), at::remainder(best_flat, kk), best_scores.to(dy.scalar_type())};
}

TORCH_LIBRARY_IMPL(sparsekernels_C, CPU, m) { m.impl("topk_grow", &topk_grow_cpu); }

}  // namespace sparsekernels::cpu
