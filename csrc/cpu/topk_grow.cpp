// topk_grow on the CPU: the k inactive positions of W [N, K] with the largest |dL/dW|,
// where dL/dW = dy^T x (dy [M, N], x [M, K]), without ever holding the dense [N, K]
// gradient (RigL's grow step).
//
// The gradient is formed one tile of output rows at a time (a BLAS GEMM of
// [rows_per_tile, M] x [M, K]), the active positions of those rows are knocked out, the
// tile's best candidates are merged into a running best-k. Extra memory is one tile plus
// about 2k candidates. fp32 on the CPU: topk_grow_keys_cpu; fp64 and the GPU: torch ops.
#include "csr_common.h"

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sparsekernels::cpu {

namespace {

// The device-generic selection below keeps every candidate list in increasing flat
// position (tiles come in position order, and each step filters without reordering), so
// "equal scores by position" needs no sort by position anywhere. NaN (an fp overflow of
// inf - inf; the inputs are finite) ranks above every number, as in the reference's sort.

// The least of `top` with NaN ranked above every number (min() would give NaN): NaN only
// when every entry is NaN. One host sync, two when the least number is +inf.
double least_ranked(const at::Tensor& top) {
  const at::Tensor nan = at::isnan(top);
  const double least = at::where(nan, std::numeric_limits<double>::infinity(), top).min().item<double>();
  if (least == std::numeric_limits<double>::infinity() && nan.all().item<bool>()) return std::nan("");
  return least;
}

// The take-th largest of `scores`, NaN ranked above every number: the least of torch's
// topk (a multi-block select on the GPU; kthvalue runs one thread block per slice, and a
// pool is one slice of millions).
double take_th_largest(const at::Tensor& scores, int64_t take) {
  return least_ranked(std::get<0>(at::topk(scores, take, 0, /*largest=*/true, /*sorted=*/false)));
}

// Which of `scores` (in position order) are among its best `take`: every score above the
// take-th largest, NaN included, then the first of those equal to it, by position. One
// select and masks: no sort.
at::Tensor best_mask(const at::Tensor& scores, int64_t take) {
  const double cut = take_th_largest(scores, take);
  at::Tensor above, tied;
  if (std::isnan(cut)) {  // at least `take` NaN: the first of them
    above = at::zeros_like(scores, scores.options().dtype(at::kBool));
    tied = at::isnan(scores);
  } else {
    above = (scores > cut).logical_or_(at::isnan(scores));
    tied = scores == cut;
  }
  const int64_t need = take - above.sum().item<int64_t>();
  // The first `need` tied entries: those whose running count of ties is at most need.
  return above.logical_or_(tied.logical_and(tied.cumsum(0, at::kInt) <= need));
}

// The `take` best entries of a flat score tile, as (flat positions, scores) in position
// order; `take` may not exceed the tile.
std::pair<at::Tensor, at::Tensor> tile_best(const at::Tensor& g, int64_t take, at::ScalarType flat_type) {
  if (take == 0) return {at::empty({0}, g.options().dtype(flat_type)), at::empty({0}, g.options())};
  const at::Tensor flat = at::nonzero(best_mask(g, take)).view({-1}).to(flat_type);  // ascending positions
  return {flat, g.index_select(0, flat)};
}

// The best `k` of a candidate pool (scores, flat positions; position order), kept in
// position order. O(pool): a full ordering per tile made the op 7x slower than dense +
// topk at k = 30% nnz.
std::pair<at::Tensor, at::Tensor> cut_best(const at::Tensor& scores, const at::Tensor& flat, int64_t k) {
  if (scores.numel() <= k) return {flat, scores};
  const at::Tensor keep = best_mask(scores, k);
  return {flat.masked_select(keep), scores.masked_select(keep)};
}

// Writes `marker` at the active positions of rows [o0, o1) of a CPU tile gp [o1 - o0, kk].
// Only this tile's entries are touched: extra memory stays O(tile).
template <typename T>
void knock_out_rows(T* gp, const int64_t* rp, const int32_t* c, int64_t o0, int64_t o1, int64_t kk, T marker) {
  at::parallel_for(o0, o1, 64, [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row)
      for (int64_t j = rp[row]; j < rp[row + 1]; ++j) gp[(row - o0) * kk + c[j]] = marker;
  });
}

// Sets the active positions of the CPU score tile g [o1 - o0, kk] to -1: every real score
// |grad| is >= 0, so -1 never beats an inactive position.
void knock_out_active(at::Tensor& g, const int64_t* rp, const int32_t* c, int64_t o0, int64_t o1, int64_t kk) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "topk_grow_mask", [&] {
    knock_out_rows(g.data_ptr<scalar_t>(), rp, c, o0, o1, kk, scalar_t(-1));
  });
}

// Sets the active positions of score tile g [rows, kk] (rows o0 .. o0 + rows of W) to -1,
// on any device: CPU tiles directly, others by index_fill (the tile's pattern slice).
void knock_out_tile(at::Tensor& g, const at::Tensor& row_ptr, const at::Tensor& ci, const int64_t* rp, int64_t o0,
                    int64_t rows, int64_t kk) {
  const int64_t e0 = rp[o0], e1 = rp[o0 + rows];
  if (e1 <= e0) return;
  if (g.is_cpu()) {
    knock_out_active(g, rp, ci.data_ptr<int32_t>(), o0, o0 + rows, kk);
    return;
  }
  const auto long_opts = g.options().dtype(at::kLong);
  const at::Tensor counts = row_ptr.narrow(0, o0 + 1, rows) - row_ptr.narrow(0, o0, rows);
  const at::Tensor local =
      at::repeat_interleave(at::arange(rows, long_opts), counts.to(at::kLong), std::nullopt, e1 - e0);
  g.view({-1}).index_fill_(0, local.mul_(kk).add_(ci.narrow(0, e0, e1 - e0).to(at::kLong)), -1.0);
}

// Rows of W whose gradient is formed ahead of the tiles to guess a floor, and how many
// times k scores the guess leaves above it over the whole gradient (as the CPU fp32
// path's sample_floor, below; the ATen version of it).
constexpr int64_t kTileSampleRows = 64;
constexpr double kTileSampleMargin = 2.0;
constexpr double kTileMinSampleRank = 64;

// A guessed lower bound of the k-th largest score over the inactive positions, from the
// scores of up to kTileSampleRows rows spread evenly over W; NaN when the sample has too
// few inactive positions to predict one. Only a guess: the caller selects again without
// it when fewer than k scores reach it.
double sample_floor_scores(const at::Tensor& dyc, const at::Tensor& xc, const at::Tensor& row_ptr,
                               const at::Tensor& ci, const int64_t* rp, int64_t k, int64_t inactive,
                               int64_t rows_per_tile) {
  const int64_t n = dyc.size(1), kk = xc.size(1), s = std::min({n, kTileSampleRows, rows_per_tile});
  std::vector<int64_t> rows(s);
  int64_t sample_inactive = s * kk;
  for (int64_t i = 0; i < s; ++i) {
    rows[i] = i * n / s;
    sample_inactive -= rp[rows[i] + 1] - rp[rows[i]];
  }
  const double want = std::max(kTileMinSampleRank, std::ceil(kTileSampleMargin * static_cast<double>(k) *
                                                             static_cast<double>(sample_inactive) /
                                                             static_cast<double>(inactive)));
  if (want > static_cast<double>(sample_inactive)) return std::nan("");
  const at::Tensor idx = at::tensor(rows, at::TensorOptions().dtype(at::kLong)).to(dyc.device());
  at::Tensor g = at::mm(dyc.index_select(1, idx).t(), xc).abs_();  // [s, K]
  for (int64_t i = 0; i < s; ++i) {  // the sampled rows' active positions
    at::Tensor row = g.narrow(0, i, 1);
    knock_out_tile(row, row_ptr, ci, rp, rows[i], 1, kk);
  }
  return take_th_largest(g.view({-1}), static_cast<int64_t>(want));
}

// Device-generic body (ATen ops only: a cuBLAS / MKL GEMM per tile, torch's topk), so
// the same code serves the CPU (fp64) and, in a CUDA build, the GPU. Inputs are checked.
//
// One pass over the gradient's tiles of rows. A floor guessed from a sample of rows
// (sample_floor_scores) bounds what a tile contributes from the first tile on: entries
// >= the floor, about kTileSampleMargin x k in all, instead of each early tile's best k
// (which took a topk of every tile and a pool of 2k). Once the pool holds k entries its
// k-th score is the floor for the rest; the pool is cut back to k whenever it passes
// 5k / 4. A guess above the true k-th score (fewer than k entries reach it) costs a
// second pass without it, never a wrong answer. Extra memory: one tile, the sample, and
// the pool (5k / 4 plus one tile's entries) with its cut's k-sized temporaries.
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_grow_tiles(const at::Tensor& dy, const at::Tensor& x,
                                                               const at::Tensor& row_ptr,
                                                               const at::Tensor& col_idx, int64_t k,
                                                               int64_t tile_elems) {
  const int64_t n = dy.size(1), kk = x.size(1);
  const auto long_opts = dy.options().dtype(at::kLong);
  // Scores are computed in fp32 at least (fp64 stays fp64) so bf16 inputs rank correctly.
  const at::ScalarType ct = compute_type(dy.scalar_type());
  if (k == 0 || n == 0 || kk == 0) {
    const at::Tensor none = at::empty({0}, long_opts);
    return {none, none.clone(), at::empty({0}, dy.options())};
  }
  const at::Tensor dyc = dy.to(ct), xc = x.to(ct).contiguous();
  // Row pointers on the host (a small copy on the GPU) to slice the pattern per tile.
  const at::Tensor rp_host = row_ptr.to(at::kCPU, at::kLong).contiguous();
  const int64_t* rp = rp_host.data_ptr<int64_t>();
  const at::Tensor ci = col_idx.contiguous();
  const int64_t rows_per_tile = std::max<int64_t>(1, std::min<int64_t>(n, tile_elems / std::max<int64_t>(kk, 1)));
  const int64_t inactive = n * kk - ci.numel();
  const int64_t cut_at = k + std::max<int64_t>(k / 4, 1);
  // Flat positions as int32 where W's positions fit (a third less pool memory in fp32).
  const at::ScalarType flat_type = n * kk <= std::numeric_limits<int32_t>::max() ? at::kInt : at::kLong;

  // One pass with `guess` (undefined: none) as the first tiles' bound; false when fewer
  // than k entries reached it.
  at::Tensor best_scores, best_flat;
  auto one_pass = [&](const at::Tensor& guess) -> bool {
    best_scores = at::empty({0}, dy.options().dtype(ct));
    best_flat = at::empty({0}, long_opts.dtype(flat_type));
    at::Tensor threshold = guess;  // entries below it cannot be among the best k
    bool full = false;             // threshold is the pool's own k-th score
    bool threshold_nan = false;    // ... and that score is NaN (the pool: k NaN)
    for (int64_t o0 = 0; o0 < n; o0 += rows_per_tile) {
      const int64_t rows = std::min(n, o0 + rows_per_tile) - o0;
      at::Tensor g = at::mm(dyc.narrow(1, o0, rows).t(), xc).abs_();  // [rows, K]
      knock_out_tile(g, row_ptr, ci, rp, o0, rows, kk);                // active: -1
      const at::Tensor gflat = g.view({-1});
      at::Tensor tile_flat, tile_scores;
      if (!threshold.defined()) {
        // No bound yet (no usable guess): the tile's own best k, ties by position.
        std::tie(tile_flat, tile_scores) = tile_best(gflat, std::min<int64_t>(k, rows * kk), flat_type);
      } else {
        // The entries that can still be among the best k, and NaN: at or above a guess
        // (ties resolved by position at the cut); strictly above the pool's own k-th score
        // (an equal one loses the tie to the k earlier positions held). The active
        // positions (-1) lie below any bound a real score set.
        at::Tensor keep = full ? gflat > threshold : gflat >= threshold;
        if (!threshold_nan) keep.logical_or_(at::isnan(gflat));
        tile_flat = at::nonzero(keep).view({-1}).to(flat_type);
        tile_scores = gflat.index_select(0, tile_flat);
      }
      tile_flat.add_(o0 * kk);
      best_scores = best_scores.numel() ? at::cat({best_scores, tile_scores}) : tile_scores;
      best_flat = best_flat.numel() ? at::cat({best_flat, tile_flat}) : tile_flat;
      if (best_scores.numel() >= cut_at || (!full && best_scores.numel() >= k && !guess.defined())) {
        std::tie(best_flat, best_scores) = cut_best(best_scores, best_flat, k);
        if (best_scores.numel() == k) {
          const double least = least_ranked(best_scores);
          threshold = at::scalar_tensor(least, best_scores.options());
          threshold_nan = std::isnan(least);
          full = true;
        }
      }
    }
    return best_scores.numel() >= k;
  };
  const double guess =
      rows_per_tile < n ? sample_floor_scores(dyc, xc, row_ptr, ci, rp, k, inactive, rows_per_tile) : std::nan("");
  // A guess of 0 bounds nothing (every inactive score is >= 0): the tiles' own best k do
  // (NaN compares false: no guess).
  const bool use_guess = guess > 0.0;
  bool ok = one_pass(use_guess ? at::scalar_tensor(guess, dyc.options()) : at::Tensor());
  if (!ok && use_guess) ok = one_pass(at::Tensor());
  TORCH_CHECK(ok, "topk_grow: internal selection error (", k, " of ", best_scores.numel(), ")");
  std::tie(best_flat, best_scores) = cut_best(best_scores, best_flat, k);
  // Score descending; the pool is in position order, so a stable sort leaves equal scores
  // by position (NaN first, as the reference's sort).
  auto [sorted_scores, order] = at::sort(best_scores, /*stable=*/true, /*dim=*/0, /*descending=*/true);
  best_scores = at::Tensor();
  best_flat = best_flat.index_select(0, order);
  return {at::div(best_flat, kk, "floor").to(at::kLong), at::remainder(best_flat, kk).to(at::kLong),
          sorted_scores.to(dy.scalar_type())};
}

// ---------------------------------------------------------------------------------
// fp32 on the CPU: one GEMM pass with a running threshold on the scores' rank keys. A
// non-negative float orders as its int32 bits do, so each score becomes a uint32 key
// (NaN one above +inf, knocked-out positions excluded) and candidates are (key, position,
// score) records. Tiles come in increasing position order, so once the pool's best k are
// known, a later entry whose key equals the k-th key loses to all of them (same key,
// later position): only keys strictly above the k-th can still enter. The pool is cut
// back to its best k (nth_element, O(pool)) whenever it reaches 2k entries. The earlier
// two-pass radix version formed every GEMM tile twice; the pool version before it spent
// its time in torch topk / sort / masked_select over the pool.
// Extra memory: one tile plus at most 2k + one tile's survivors.
namespace {

inline uint32_t score_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}

// Rank key of a gradient entry g: the bits of |g|, every NaN one key above +inf (the
// reference ranks NaN above every number; a product of finite inputs can overflow to
// inf - inf). Active positions hold kActive (a NaN bit pattern no arithmetic produces from
// finite inputs) and are never selected. Folding |.| into the key saves a pass per tile.
constexpr uint32_t kActive = 0xFFFFFFFFu;
constexpr uint32_t kNaNKey = 0x7F800001u;
inline uint32_t rank_key_of_bits(uint32_t u) { return std::min<uint32_t>(u & 0x7FFFFFFFu, kNaNKey); }

// A grow candidate. Its position order is its order in the pool (see below), so no flat
// index is kept for tie-breaking, and rows / columns need no division at the end.
struct Candidate {
  uint32_t key;
  float score;
  int32_t row;
  int32_t col;
};

// dy[:, o0:o1]^T x for one tile into `g` (a reused buffer: a fresh 4 MiB tile per GEMM
// cost its page faults every time), the active positions of its rows set to kActive.
void gradient_tile(const at::Tensor& dyc, const at::Tensor& xc, const int64_t* rp, const int32_t* c, int64_t o0,
                   int64_t o1, int64_t kk, at::Tensor& g) {
  at::mm_out(g, dyc.narrow(1, o0, o1 - o0).t(), xc);
  knock_out_rows(reinterpret_cast<uint32_t*>(g.data_ptr<float>()), rp, c, o0, o1, kk, kActive);
}

// The k-th largest of the keys `for_each_key(f)` visits (calling f(key) once per key), by
// a two-digit radix select (counts of the upper, then of the lower 16 bits in the bin
// holding it). False when there are fewer than k keys; else kth and `above`, the number of
// larger keys. `count` holds 2^16 scratch counters.
template <typename ForEachKey>
bool kth_largest_key(ForEachKey for_each_key, int64_t k, std::vector<int64_t>& count, uint32_t& kth,
                     int64_t& above) {
  std::fill(count.begin(), count.end(), 0);
  for_each_key([&](uint32_t key) { ++count[key >> 16]; });
  above = 0;
  int64_t hi = 0xFFFF;
  for (; hi >= 0 && above + count[hi] < k; --hi) above += count[hi];
  if (hi < 0) return false;
  std::fill(count.begin(), count.end(), 0);
  for_each_key([&](uint32_t key) {
    if ((key >> 16) == static_cast<uint32_t>(hi)) ++count[key & 0xFFFF];
  });
  int64_t lo = 0xFFFF;
  for (; above + count[lo] < k; --lo) above += count[lo];
  kth = (static_cast<uint32_t>(hi) << 16) | static_cast<uint32_t>(lo);
  return true;
}

// For kth_largest_key: visits the rank keys of a score tile's `count` entries, skipping
// the active positions.
inline auto inactive_keys(const uint32_t* gp, int64_t count) {
  return [gp, count](auto f) {
    for (int64_t i = 0; i < count; ++i)
      if (gp[i] != kActive) f(rank_key_of_bits(gp[i]));
  };
}

// Appends the entries of tile row `row` (columns [c0, kk), at gp) whose rank key beats
// `floor` (any key when `use_floor` is false; active positions never) as candidates, in
// column order.
inline void collect_scalar(const uint32_t* gp, int64_t c0, int64_t kk, int32_t row, bool use_floor, uint32_t floor,
                           std::vector<Candidate>& out) {
  for (int64_t j = c0; j < kk; ++j) {
    const uint32_t u = gp[j];
    const uint32_t key = rank_key_of_bits(u);
    if (u == kActive || (use_floor && key <= floor)) continue;
    const uint32_t mag = u & 0x7FFFFFFFu;
    float score;
    std::memcpy(&score, &mag, sizeof(score));
    out.push_back({key, score, row, static_cast<int32_t>(j)});
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The same with a floor, 16 entries per compare: after the first few tiles only a small
// fraction of the entries beats the floor, so the scan is the cost.
__attribute__((target("avx512f"))) void collect_avx512(const uint32_t* gp, int64_t kk, int32_t row, uint32_t floor,
                                                       std::vector<Candidate>& out) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF), nan_key = _mm512_set1_epi32(static_cast<int>(kNaNKey));
  const __m512i fl = _mm512_set1_epi32(static_cast<int>(floor)), active = _mm512_set1_epi32(-1);
  int64_t j = 0;
  for (; j + 16 <= kk; j += 16) {
    const __m512i u = _mm512_loadu_si512(gp + j);
    const __m512i key = _mm512_min_epu32(_mm512_and_si512(u, abs_mask), nan_key);
    __mmask16 m = _mm512_cmpgt_epu32_mask(key, fl) & _mm512_cmpneq_epi32_mask(u, active);
    while (m) {
      const int lane = __builtin_ctz(m);
      m &= m - 1;
      const uint32_t mag = gp[j + lane] & 0x7FFFFFFFu;
      float score;
      std::memcpy(&score, &mag, sizeof(score));
      out.push_back({rank_key_of_bits(gp[j + lane]), score, row, static_cast<int32_t>(j + lane)});
    }
  }
  collect_scalar(gp, j, kk, row, true, floor, out);
}
#endif

void collect_row(const uint32_t* gp, int64_t kk, int32_t row, bool use_floor, uint32_t floor,
                 std::vector<Candidate>& out) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (use_floor && simd_level() == SimdLevel::kAvx512) return collect_avx512(gp, kk, row, floor, out);
#endif
  collect_scalar(gp, 0, kk, row, use_floor, floor, out);
}

}  // namespace

// Rows of W whose gradient is formed ahead of the tiles to guess a floor (sample_floor).
constexpr int64_t kSampleRows = 64;
// The guessed floor sits where the sample predicts this many times k keys above it over
// the whole gradient: room for the sample's error before the guess fails.
constexpr int64_t kSampleMargin = 2;
// And at least this far down the sample: the sample's GEMM rounds differently from the
// tiles', so at rank 1 (k = 1) its top key can lie above every key the tiles form.
constexpr double kMinSampleRank = 64;

// A guess at a lower bound of the k-th largest key over all inactive positions: the
// gradient of kSampleRows rows spread evenly over W, its key at the rank that predicts
// kSampleMargin x k keys at or above it overall. 0 (no floor) when the sample has too few
// inactive positions. Only a guess: a pattern whose sampled rows carry much larger
// gradients than the rest can put it above the true k-th key, which the caller detects
// (fewer than k candidates collected) and then selects again without it. Without it the
// first tiles see only a small part of the gradient, their k-th keys are low, and the
// pool takes in k x (1 + ln(tiles)) candidates (4096 x 4096, 90% sparse, k = 30% of nnz: 2 ms
// of collecting and cutting per 1 ms of GEMM).
// At most a tile's rows, so the extra memory stays one tile's worth.
uint32_t sample_floor(const at::Tensor& dyc, const at::Tensor& xc, const int64_t* rp, const int32_t* c, int64_t k,
                      int64_t inactive, int64_t rows_per_tile, std::vector<int64_t>& count) {
  const int64_t n = dyc.size(1), kk = xc.size(1), s = std::min({n, kSampleRows, rows_per_tile});
  std::vector<int64_t> rows(s);
  for (int64_t i = 0; i < s; ++i) rows[i] = i * n / s;
  const at::Tensor idx = at::from_blob(rows.data(), {s}, at::kLong);
  at::Tensor g = at::mm(dyc.index_select(1, idx).t(), xc);  // [s, K]
  uint32_t* gp = reinterpret_cast<uint32_t*>(g.data_ptr<float>());
  int64_t sample_inactive = s * kk;
  for (int64_t i = 0; i < s; ++i) {
    for (int64_t j = rp[rows[i]]; j < rp[rows[i] + 1]; ++j) gp[i * kk + c[j]] = kActive;
    sample_inactive -= rp[rows[i] + 1] - rp[rows[i]];
  }
  // ceil(margin k sample_inactive / inactive), in double: the product overflows no int64
  // here, but k x elements can approach 2^62 for the largest layers allowed.
  const double want = std::max(kMinSampleRank, std::ceil(static_cast<double>(kSampleMargin) * static_cast<double>(k) *
                                                         static_cast<double>(sample_inactive) /
                                                         static_cast<double>(inactive)));
  if (want > static_cast<double>(sample_inactive)) return 0;  // want >= kMinSampleRank >= 1
  uint32_t kth = 0;
  int64_t above = 0;
  const int64_t total = s * kk;
  kth_largest_key(inactive_keys(gp, total), static_cast<int64_t>(want), count, kth, above);
  return kth;
}

// The best k candidates (position order, see below) of the inactive positions, from one
// pass over the gradient's tiles. Only keys >= `guess` are collected (0: all); false when
// fewer than k of them exist, i.e. the guess was above the true k-th key.
bool collect_best(const at::Tensor& dyc, const at::Tensor& xc, const int64_t* rp, const int32_t* c, int64_t k,
                  int64_t rows_per_tile, uint32_t guess, std::vector<int64_t>& count, std::vector<Candidate>& pool) {
  const int64_t n = dyc.size(1), kk = xc.size(1);
  const int threads = at::get_num_threads();
  pool.clear();
  // The pool stays in increasing position order (tiles and blocks are appended in order,
  // cuts keep order), so ties at the k-th key are resolved by order alone and the final
  // sort by key can be a stable radix sort.
  bool full = false;     // the pool has held k candidates: `floor` is the k-th best key
  uint32_t floor = 0;
  auto cut_to_k = [&]() {
    // The pool's k-th largest key (it holds at least k), then an order-keeping filter:
    // every larger key, and the first `tied` of the k-th key.
    uint32_t kth = 0;
    int64_t above = 0;
    kth_largest_key([&](auto f) { for (const auto& a : pool) f(a.key); }, k, count, kth, above);
    int64_t tied = k - above;
    auto last = std::copy_if(pool.begin(), pool.end(), pool.begin(), [&](const Candidate& a) {
      return a.key > kth || (a.key == kth && tied-- > 0);
    });
    pool.erase(last, pool.end());
    floor = kth;
    full = true;
  };
  at::Tensor tile = at::empty({rows_per_tile, kk}, xc.options());
  // Each block's candidates, kept from tile to tile so their storage is allocated once
  // per call, not once per tile (no measurable change in the call's time here).
  std::vector<std::vector<Candidate>> found(std::min<int64_t>(rows_per_tile, 4 * static_cast<int64_t>(threads)));
  for (int64_t o0 = 0; o0 < n; o0 += rows_per_tile) {
    const int64_t o1 = std::min(n, o0 + rows_per_tile);
    const int64_t rows = o1 - o0;
    at::Tensor g = tile.narrow(0, 0, rows);
    gradient_tile(dyc, xc, rp, c, o0, o1, kk, g);
    const uint32_t* gp = reinterpret_cast<const uint32_t*>(g.data_ptr<float>());
    const int64_t blocks = std::min<int64_t>(rows, static_cast<int64_t>(found.size()));
    for (auto& f : found) f.clear();
    // Collect keys above `fl`: the pool's k-th once it has one, else keys >= the guess.
    bool use_floor = full || guess > 0;
    uint32_t fl = full ? floor : (guess > 0 ? guess - 1 : 0);
    if (!full && pool.empty() && guess == 0) {
      // First tile: when it alone holds k candidates, its own k-th key bounds the final
      // k-th key from below, so only keys >= it need collecting (the cut below resolves
      // the ties at it by position). A radix select over the tile's keys, instead of
      // collecting and then cutting a million records. Not with a guess: a tile's k-th
      // key lies below a guess made for the whole gradient, unless the guess is far off.
      uint32_t kth = 0;
      int64_t above = 0;
      const bool enough = kth_largest_key(inactive_keys(gp, rows * kk), k, count, kth, above);
      if (enough && kth > 0) {
        use_floor = true;
        fl = kth - 1;  // collect keys >= kth
      }
    }
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = rows * blk / blocks, r1 = rows * (blk + 1) / blocks;
        for (int64_t r = r0; r < r1; ++r)
          collect_row(gp + r * kk, kk, static_cast<int32_t>(o0 + r), use_floor, fl, found[blk]);
      }
    });
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const auto& f = found[blk];
      pool.insert(pool.end(), f.begin(), f.end());
      if (static_cast<int64_t>(pool.size()) >= 2 * k) cut_to_k();
    }
    // A floor as soon as the pool holds k: later tiles then collect only what beats it.
    if (!full && static_cast<int64_t>(pool.size()) >= k) cut_to_k();
  }
  if (static_cast<int64_t>(pool.size()) < k) return false;
  if (static_cast<int64_t>(pool.size()) > k) cut_to_k();
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_grow_keys_cpu(const at::Tensor& dy, const at::Tensor& x,
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
  TORCH_CHECK_VALUE(n <= INT32_MAX && kk <= INT32_MAX, "topk_grow: W [N, K] must have N, K < 2^31");
  const int64_t inactive = n * kk - ci.numel();
  std::vector<Candidate> pool;
  pool.reserve(std::min(2 * k, inactive) + rows_per_tile * kk);
  std::vector<int64_t> count(1 << 16);
  // A guessed floor pays where the tiles are several; with one tile the first tile's own
  // k-th key is exact. A wrong guess costs a second pass (never a wrong answer).
  const uint32_t guess = rows_per_tile < n ? sample_floor(dyc, xc, rp, c, k, inactive, rows_per_tile, count) : 0;
  bool ok = collect_best(dyc, xc, rp, c, k, rows_per_tile, guess, count, pool);
  if (!ok && guess > 0) ok = collect_best(dyc, xc, rp, c, k, rows_per_tile, 0, count, pool);
  TORCH_CHECK(ok, "topk_grow: internal selection error (", k, " of ", pool.size(), ")");
  // Final order: score descending, equal scores by position: a stable LSD radix sort of
  // the position-ordered pool on the complemented key, two 16-bit digits.
  std::vector<Candidate> scratch(k);
  for (int shift = 0; shift < 32; shift += 16) {
    std::vector<int64_t> start((1 << 16) + 1, 0);
    for (const auto& a : pool) ++start[((~a.key >> shift) & 0xFFFF) + 1];
    for (int d = 0; d < (1 << 16); ++d) start[d + 1] += start[d];
    for (const auto& a : pool) scratch[start[(~a.key >> shift) & 0xFFFF]++] = a;
    pool.swap(scratch);
  }
  at::Tensor rows_out = at::empty({k}, at::kLong), cols_out = at::empty({k}, at::kLong);
  at::Tensor scores = at::empty({k}, at::kFloat);
  int64_t* ro = rows_out.data_ptr<int64_t>();
  int64_t* co = cols_out.data_ptr<int64_t>();
  float* so = scores.data_ptr<float>();
  for (int64_t i = 0; i < k; ++i) {
    ro[i] = pool[i].row;
    co[i] = pool[i].col;
    so[i] = pool[i].score;
  }
  return {rows_out, cols_out, scores.to(dy.scalar_type())};
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
  if (compute_type(dy.scalar_type()) == at::kFloat) return topk_grow_keys_cpu(dy, x, row_ptr, col_idx, k, tile_elems);
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
