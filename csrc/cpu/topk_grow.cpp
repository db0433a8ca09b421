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

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

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

// The best `k` of a candidate pool (scores, flat positions) under the same rule: all
// above the cut-off value, then the tied ones of lowest position. O(pool), no sort of
// the pool (a full ordering per tile made the op 7x slower than dense + topk at k = 30% nnz).
std::pair<at::Tensor, at::Tensor> cut_best(const at::Tensor& scores, const at::Tensor& flat, int64_t k) {
  if (scores.numel() <= k) return {flat, scores};
  auto [top, idx] = at::topk(scores, k, 0, /*largest=*/true, /*sorted=*/false);
  const at::Tensor cut = top.min();
  const at::Tensor above = scores > cut;
  const at::Tensor tied_flat = flat.masked_select(scores == cut);
  const at::Tensor tied_sorted = std::get<0>(at::sort(tied_flat));
  const int64_t n_above = above.sum().item<int64_t>();
  const at::Tensor keep_flat = at::cat({flat.masked_select(above), tied_sorted.narrow(0, 0, k - n_above)});
  const at::Tensor keep_scores =
      at::cat({scores.masked_select(above), at::full({k - n_above}, cut.item<double>(), scores.options())});
  return {keep_flat, keep_scores};
}

// Sets the active positions of rows [o0, o1) in the CPU score tile g [o1 - o0, kk] to -1:
// every real score |grad| is >= 0, so -1 never beats an inactive position. Only this
// tile's entries are touched: extra memory stays O(tile).
void knock_out_active(at::Tensor& g, const int64_t* rp, const int32_t* c, int64_t o0, int64_t o1, int64_t kk) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "topk_grow_mask", [&] {
    scalar_t* gp = g.data_ptr<scalar_t>();
    at::parallel_for(o0, o1, 64, [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row)
        for (int64_t j = rp[row]; j < rp[row + 1]; ++j) gp[(row - o0) * kk + c[j]] = scalar_t(-1);
    });
  });
}

// Device-generic body (ATen ops only: a cuBLAS / MKL GEMM per tile, torch's topk), so
// the same code serves the CPU and, in a CUDA build, the GPU. Inputs are checked.
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_grow_tiles(const at::Tensor& dy, const at::Tensor& x,
                                                               const at::Tensor& row_ptr,
                                                               const at::Tensor& col_idx, int64_t k,
                                                               int64_t tile_elems) {
  const int64_t n = dy.size(1), kk = x.size(1);
  const auto long_opts = dy.options().dtype(at::kLong);
  // Scores are computed in fp32 at least (fp64 stays fp64) so bf16 inputs rank correctly.
  const at::ScalarType ct = compute_type(dy.scalar_type());
  at::Tensor best_scores = at::empty({0}, dy.options().dtype(ct));
  at::Tensor best_flat = at::empty({0}, long_opts);
  if (k == 0 || n == 0 || kk == 0) {
    return {best_flat, best_flat.clone(), best_scores.to(dy.scalar_type())};
  }
  const at::Tensor dyc = dy.to(ct), xc = x.to(ct).contiguous();
  // Row pointers on the host (a small copy on the GPU) to slice the pattern per tile.
  const at::Tensor rp_host = row_ptr.to(at::kCPU, at::kLong).contiguous();
  const int64_t* rp = rp_host.data_ptr<int64_t>();
  const at::Tensor ci = col_idx.contiguous();
  const int64_t rows_per_tile = std::max<int64_t>(1, std::min<int64_t>(n, tile_elems / std::max<int64_t>(kk, 1)));
  at::Tensor threshold;  // the pool's k-th best score once the pool holds k candidates

  for (int64_t o0 = 0; o0 < n; o0 += rows_per_tile) {
    const int64_t o1 = std::min(n, o0 + rows_per_tile), rows = o1 - o0;
    at::Tensor g = at::mm(dyc.narrow(1, o0, rows).t(), xc).abs_();  // [rows, K]
    // Knock out the tile's active positions (set to -1; on the GPU by index_fill).
    const int64_t e0 = rp[o0], e1 = rp[o1];
    if (e1 > e0 && g.is_cpu()) {
      knock_out_active(g, rp, ci.data_ptr<int32_t>(), o0, o1, kk);
    } else if (e1 > e0) {
      const at::Tensor counts = row_ptr.narrow(0, o0 + 1, rows) - row_ptr.narrow(0, o0, rows);
      const at::Tensor local = at::repeat_interleave(at::arange(rows, long_opts), counts.to(at::kLong),
                                                     std::nullopt, e1 - e0);
      g.view({-1}).index_fill_(0, local.mul_(kk).add_(ci.narrow(0, e0, e1 - e0).to(at::kLong)), -1.0);
    }
    // Candidates of this tile: its best k while the pool is not full yet; afterwards only
    // entries >= the pool's k-th score (ties kept, resolved by position at the cut), which
    // is a small fraction of the tile.
    at::Tensor tile_flat, tile_scores;
    const at::Tensor gflat = g.view({-1});
    if (!threshold.defined()) {
      std::tie(tile_flat, tile_scores) = tile_best(gflat, std::min<int64_t>(k, rows * kk));
    } else {
      tile_flat = at::nonzero(gflat >= threshold).view({-1});
      tile_scores = gflat.index_select(0, tile_flat);
    }
    tile_flat.add_(o0 * kk);
    best_scores = best_scores.numel() ? at::cat({best_scores, tile_scores}) : tile_scores;
    best_flat = best_flat.numel() ? at::cat({best_flat, tile_flat}) : tile_flat;
    if (best_scores.numel() >= 2 * k || (!threshold.defined() && best_scores.numel() >= k)) {
      std::tie(best_flat, best_scores) = cut_best(best_scores, best_flat, k);
      if (best_scores.numel() == k) threshold = best_scores.min();
    }
  }
  std::tie(best_flat, best_scores) = cut_best(best_scores, best_flat, k);
  const at::Tensor order = by_score_then_position(best_scores, best_flat);
  best_flat = best_flat.index_select(0, order);
  best_scores = best_scores.index_select(0, order);
  return {at::div(best_flat, kk, "floor"), at::remainder(best_flat, kk), best_scores.to(dy.scalar_type())};
}

// ---------------------------------------------------------------------------------
// fp32 on the CPU: a radix select over the scores' bit patterns instead of a running
// pool. A non-negative float orders as its int32 bits do, so the k-th best score lies in
// one bin of the upper 16 bits: pass 1 forms every tile (one GEMM each), knocks out the
// active positions and counts the bins; pass 2 forms the tiles again and keeps every
// entry of a higher bin plus the entries of the cut-off bin, from which the rest is
// chosen exactly (score, then position). The pool version spent most of its time in
// topk / sort / masked_select over pools of up to 2k entries (k is ~30% of nnz for RigL);
// this costs a second GEMM pass but touches each score in two cheap linear scans.
// Extra memory: one tile plus the selected entries and the cut-off bin.
namespace {

constexpr int kBins = 1 << 16;

inline uint32_t score_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}

// Rank key of a score: its bits, every NaN one key above +inf (the reference ranks NaN
// above every number; a product of finite inputs can overflow to inf - inf). Knocked-out
// positions (-1, sign bit set) get kNone and are never selected.
constexpr uint32_t kNone = 0xFFFFFFFFu;
inline uint32_t rank_key(float v) {
  const uint32_t u = score_bits(v);
  return (u >> 31) ? kNone : std::min<uint32_t>(u, 0x7F800001u);
}

// |dy[:, o0:o1]^T x| for one tile, the active positions of its rows set to -1 (a
// negative score, never selected: every real score is >= 0).
at::Tensor score_tile(const at::Tensor& dyc, const at::Tensor& xc, const int64_t* rp, const int32_t* c,
                      int64_t o0, int64_t o1, int64_t kk) {
  at::Tensor g = at::mm(dyc.narrow(1, o0, o1 - o0).t(), xc).abs_();
  knock_out_active(g, rp, c, o0, o1, kk);
  return g;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_grow_radix_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                                   const at::Tensor& row_ptr,
                                                                   const at::Tensor& col_idx, int64_t k,
                                                                   int64_t tile_elems) {
  const int64_t n = dy.size(1), kk = x.size(1);
  const auto long_opts = dy.options().dtype(at::kLong);
  if (k == 0 || n == 0 || kk == 0) {
    const at::Tensor none = at::empty({0}, long_opts);
    return {none, none.clone(), at::empty({0}, dy.options())};
  }
  const at::Tensor dyc = dy.to(at::kFloat), xc = x.to(at::kFloat).contiguous();
  const at::Tensor rp_long = row_ptr.to(at::kLong).contiguous();
  const int64_t* rp = rp_long.data_ptr<int64_t>();
  const at::Tensor ci = col_idx.contiguous();
  const int32_t* c = ci.data_ptr<int32_t>();
  const int64_t rows_per_tile = std::max<int64_t>(1, std::min<int64_t>(n, tile_elems / std::max<int64_t>(kk, 1)));
  const int threads = at::get_num_threads();

  // Pass 1: bin counts of the upper 16 bits of every inactive position's score.
  std::vector<int64_t> hist(kBins, 0);
  for (int64_t o0 = 0; o0 < n; o0 += rows_per_tile) {
    const int64_t o1 = std::min(n, o0 + rows_per_tile);
    const at::Tensor g = score_tile(dyc, xc, rp, c, o0, o1, kk);
    const float* gp = g.data_ptr<float>();
    const int64_t total = (o1 - o0) * kk;
    std::vector<std::vector<int64_t>> local(threads);
    at::parallel_for(0, total, 1 << 16, [&](int64_t b, int64_t e) {
      auto& h = local[at::get_thread_num()];
      if (h.empty()) h.assign(kBins, 0);
      for (int64_t i = b; i < e; ++i) {
        const uint32_t key = rank_key(gp[i]);
        if (key != kNone) ++h[key >> 16];
      }
    });
    for (const auto& h : local)
      if (!h.empty())
        for (int b = 0; b < kBins; ++b) hist[b] += h[b];
  }
  // The bin holding the k-th best score, and how many scores lie in higher bins.
  int64_t above = 0;
  int cut_bin = kBins - 1;
  for (; cut_bin > 0 && above + hist[cut_bin] < k; --cut_bin) above += hist[cut_bin];
  const uint32_t cut_hi = static_cast<uint32_t>(cut_bin);

  // Pass 2: every score of a higher bin is selected; the cut-off bin's are candidates.
  // Collected per row block in row order, so positions come out ascending.
  std::vector<int64_t> sel_flat, cand_flat;
  std::vector<float> sel_score, cand_score;
  std::vector<uint32_t> cand_key;
  sel_flat.reserve(above);
  sel_score.reserve(above);
  cand_flat.reserve(hist[cut_bin]);
  cand_score.reserve(hist[cut_bin]);
  cand_key.reserve(hist[cut_bin]);
  for (int64_t o0 = 0; o0 < n; o0 += rows_per_tile) {
    const int64_t o1 = std::min(n, o0 + rows_per_tile);
    const at::Tensor g = score_tile(dyc, xc, rp, c, o0, o1, kk);
    const float* gp = g.data_ptr<float>();
    const int64_t rows = o1 - o0;
    const int64_t blocks = std::min<int64_t>(rows, 4 * static_cast<int64_t>(threads));
    std::vector<std::vector<int64_t>> bf(blocks), cf(blocks);
    std::vector<std::vector<float>> bs(blocks), cs(blocks);
    std::vector<std::vector<uint32_t>> ck(blocks);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = rows * blk / blocks, r1 = rows * (blk + 1) / blocks;
        for (int64_t i = r0 * kk; i < r1 * kk; ++i) {
          const float v = gp[i];
          const uint32_t key = rank_key(v);
          if (key == kNone) continue;
          const uint32_t hi = key >> 16;
          if (hi > cut_hi) {
            bf[blk].push_back(o0 * kk + i);
            bs[blk].push_back(v);
          } else if (hi == cut_hi) {
            cf[blk].push_back(o0 * kk + i);
            cs[blk].push_back(v);
            ck[blk].push_back(key);
          }
        }
      }
    });
    for (int64_t blk = 0; blk < blocks; ++blk) {
      sel_flat.insert(sel_flat.end(), bf[blk].begin(), bf[blk].end());
      sel_score.insert(sel_score.end(), bs[blk].begin(), bs[blk].end());
      cand_flat.insert(cand_flat.end(), cf[blk].begin(), cf[blk].end());
      cand_score.insert(cand_score.end(), cs[blk].begin(), cs[blk].end());
      cand_key.insert(cand_key.end(), ck[blk].begin(), ck[blk].end());
    }
  }
  // The best (k - above) candidates of the cut-off bin: score descending, then position.
  const int64_t need = k - static_cast<int64_t>(sel_flat.size());
  TORCH_CHECK(need >= 0 && need <= static_cast<int64_t>(cand_flat.size()),
              "topk_grow: internal selection error (", need, " of ", cand_flat.size(), ")");
  std::vector<int64_t> order(cand_flat.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  auto better = [&](int64_t a, int64_t b) {  // by rank key: a strict order even with NaN
    return cand_key[a] > cand_key[b] || (cand_key[a] == cand_key[b] && cand_flat[a] < cand_flat[b]);
  };
  if (need < static_cast<int64_t>(order.size())) std::nth_element(order.begin(), order.begin() + need, order.end(), better);
  order.resize(need);
  std::sort(order.begin(), order.end());  // back to ascending position
  // Both lists are position-ascending: merge them into one (O(k), no sort by position).
  at::Tensor flat = at::empty({k}, at::kLong);
  at::Tensor scores = at::empty({k}, at::kFloat);
  int64_t* fp = flat.data_ptr<int64_t>();
  float* sp = scores.data_ptr<float>();
  size_t a = 0, b = 0;
  for (int64_t i = 0; i < k; ++i) {
    const bool from_sel = b == order.size() || (a < sel_flat.size() && sel_flat[a] < cand_flat[order[b]]);
    if (from_sel) {
      fp[i] = sel_flat[a];
      sp[i] = sel_score[a++];
    } else {
      fp[i] = cand_flat[order[b]];
      sp[i] = cand_score[order[b++]];
    }
  }
  // Final order: score descending, equal scores by position (a stable sort of the
  // position-ascending list).
  const at::Tensor by_score = std::get<1>(at::sort(scores, /*stable=*/true, /*dim=*/0, /*descending=*/true));
  flat = flat.index_select(0, by_score);
  scores = scores.index_select(0, by_score);
  return {at::div(flat, kk, "floor"), at::remainder(flat, kk), scores.to(dy.scalar_type())};
}

void check_topk_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                     const at::Tensor& col_idx, int64_t k, int64_t tile_elems) {
  TORCH_CHECK_TYPE(at::isFloatingType(dy.scalar_type()) && x.scalar_type() == dy.scalar_type(),
                   "topk_grow: dy and x must share one floating dtype, got ", dy.scalar_type(), " and ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(dy.dim() == 2 && x.dim() == 2 && dy.size(0) == x.size(0),
                    "topk_grow: dy [M, N] and x [M, K] must be 2-D with equal M, got ", dy.sizes(), " and ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.device() == dy.device() && row_ptr.device() == dy.device() && col_idx.device() == dy.device(),
                    "topk_grow: all tensors must be on one device");
  const int64_t inactive = dy.size(1) * x.size(1) - col_idx.numel();
  TORCH_CHECK_VALUE(k >= 0 && k <= inactive, "topk_grow: k must be in [0, inactive positions = ", inactive,
                    "], got ", k);
  TORCH_CHECK_VALUE(tile_elems > 0, "topk_grow: tile_elems must be positive, got ", tile_elems);
  // A NaN score has no place in the ranking (a NaN cut-off made the selection read past
  // its candidates), and a gradient holding NaN / inf means the step itself diverged:
  // refuse it by name rather than grow positions from it.
  TORCH_CHECK_VALUE(dy.numel() == 0 || at::isfinite(dy).all().item<bool>(),
                    "topk_grow: dy (the output gradient) holds NaN or inf values; the growth scores |dy^T x| "
                    "are undefined for a non-finite gradient (skip the update or fix the loss scaling)");
  TORCH_CHECK_VALUE(x.numel() == 0 || at::isfinite(x).all().item<bool>(),
                    "topk_grow: x (the layer input) holds NaN or inf values; the growth scores |dy^T x| are "
                    "undefined for a non-finite input");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_grow_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                             const at::Tensor& row_ptr,
                                                             const at::Tensor& col_idx, int64_t k,
                                                             int64_t tile_elems) {
  check_topk_args(dy, x, row_ptr, col_idx, k, tile_elems);
  const at::Tensor placeholder = at::empty({col_idx.numel()}, dy.options());
  check_csr("topk_grow", placeholder, row_ptr, col_idx, dy.size(1), x.size(1));
  if (compute_type(dy.scalar_type()) == at::kFloat) return topk_grow_radix_cpu(dy, x, row_ptr, col_idx, k, tile_elems);
  return topk_grow_tiles(dy, x, row_ptr, col_idx, k, tile_elems);
}

#ifdef SPARSEKERNELS_WITH_CUDA
// The GPU runs the same tiles on cuBLAS. The pattern is checked with device reductions
// (one sync; the update step is not in the per-step hot path).
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_grow_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                              const at::Tensor& row_ptr,
                                                              const at::Tensor& col_idx, int64_t k,
                                                              int64_t tile_elems) {
  check_topk_args(dy, x, row_ptr, col_idx, k, tile_elems);
  TORCH_CHECK_TYPE(row_ptr.scalar_type() == at::kInt && col_idx.scalar_type() == at::kInt,
                   "topk_grow: row_ptr and col_idx must be int32");
  TORCH_CHECK_VALUE(row_ptr.dim() == 1 && row_ptr.numel() == dy.size(1) + 1 && col_idx.dim() == 1,
                    "topk_grow: row_ptr must have N + 1 entries");
  if (col_idx.numel()) {
    TORCH_CHECK_VALUE(col_idx.min().item<int32_t>() >= 0 && col_idx.max().item<int32_t>() < x.size(1),
                      "topk_grow: col_idx entries must lie in [0, ", x.size(1), ")");
  }
  return topk_grow_tiles(dy, x, row_ptr, col_idx, k, tile_elems);
}

TORCH_LIBRARY_IMPL(sparsekernels_C, CUDA, m) { m.impl("topk_grow", &topk_grow_cuda); }
#endif

TORCH_LIBRARY_IMPL(sparsekernels_C, CPU, m) { m.impl("topk_grow", &topk_grow_cpu); }

}  // namespace sparsekernels::cpu
