// 2:4 prune + compress on the CPU, one pass over the dense weight.
//
// sparse24_compress(w [N, K]) -> (values [N, K/2], meta [N, K/4] uint8, mask [N, K] bool):
// in every group of 4 along a row keep the 2 largest |w| (NaN above every number, ties:
// the earlier position),
// write them in column order and their positions as i0 | i1 << 2.
// With transposable=true each aligned 4x4 tile instead keeps the pattern, among the 90
// with two per row AND two per column, of largest sum |w| (first on ties), so W^T is 2:4
// as well (the input-gradient product of 2:4 training needs it).
#include "csr_common.h"

#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace sparsekernels::cpu {
namespace {

// Row patterns: the 6 ways to keep 2 of 4, as bit masks (bit j = column j kept).
constexpr std::array<uint8_t, 6> kPairs = {0b0011, 0b0101, 0b1001, 0b0110, 0b1010, 0b1100};

// The 90 4x4 tiles with two per row and two per column, as 4 row masks each, in the
// order of itertools.product over kPairs (the Python reference enumerates the same way).
const std::vector<std::array<uint8_t, 4>>& transposable_patterns() {
  static const std::vector<std::array<uint8_t, 4>> pats = [] {
    std::vector<std::array<uint8_t, 4>> out;
    for (uint8_t a : kPairs)
      for (uint8_t b : kPairs)
        for (uint8_t c : kPairs)
          for (uint8_t d : kPairs) {
            bool ok = true;
            for (int col = 0; col < 4; ++col) {
              const int n = ((a >> col) & 1) + ((b >> col) & 1) + ((c >> col) & 1) + ((d >> col) & 1);
              ok &= n == 2;
            }
            if (ok) out.push_back({a, b, c, d});
          }
    return out;
  }();
  return pats;
}

// Branch-free top 2 of a group: the 6 comparisons c_ij = (key_i >= key_j), i < j (bit p of
// the code for pair p in 01, 02, 03, 12, 13, 23), index a table of keep masks. j beats an
// earlier i only when strictly larger, so ties go to the earlier position; the order is
// total (see rank_key), so the wins are 3, 2, 1, 0 and the two with the most are kept.
struct GroupTables {
  std::array<uint8_t, 64> keep{};     // comparison code -> kept-position bits
  std::array<uint32_t, 16> mask{};    // kept bits -> 4 bool bytes, in memory order
  std::array<uint8_t, 16> first{}, second{};  // kept bits -> the two positions
};

const GroupTables& group_tables() {
  static const GroupTables t = [] {
    GroupTables g;
    constexpr int kPairIdx[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};
    for (int code = 0; code < 64; ++code) {
      int wins[4] = {0, 0, 0, 0};
      for (int p = 0; p < 6; ++p) ++wins[((code >> p) & 1) ? kPairIdx[p][0] : kPairIdx[p][1]];
      int a = 0;
      for (int j = 1; j < 4; ++j)
        if (wins[j] > wins[a]) a = j;
      int b = a == 0 ? 1 : 0;
      for (int j = 0; j < 4; ++j)
        if (j != a && wins[j] > wins[b]) b = j;
      g.keep[code] = static_cast<uint8_t>((1u << a) | (1u << b));
    }
    for (int bits = 0; bits < 16; ++bits) {
      uint8_t bytes[4];
      int slot = 0, pos[2] = {0, 0};
      for (int j = 0; j < 4; ++j) {
        bytes[j] = static_cast<uint8_t>((bits >> j) & 1);
        if (((bits >> j) & 1) && slot < 2) pos[slot++] = j;
      }
      std::memcpy(&g.mask[bits], bytes, 4);
      g.first[bits] = static_cast<uint8_t>(pos[0]);
      g.second[bits] = static_cast<uint8_t>(pos[1]);
    }
    return g;
  }();
  return t;
}

// Selection key of a weight: |w| with every NaN above +inf and all NaNs equal (the order
// documented in sparsekernels/formats/sparse24.py, torch.sort's order). On the bits of a
// non-negative float the unsigned order is the magnitude order, and every NaN pattern lies
// above +inf's; clamping them to the top value makes NaNs tie (the earlier one wins).
// A plain float comparison is false for NaN on both sides, which dropped NaN weights.
inline uint32_t rank_key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  u &= 0x7fffffffu;
  return u > 0x7f800000u ? 0xffffffffu : u;
}

inline uint64_t rank_key(double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof(u));
  u &= 0x7fffffffffffffffull;
  return u > 0x7ff0000000000000ull ? ~0ull : u;
}

template <typename scalar_t>
inline uint8_t top2(const scalar_t* w, const GroupTables& t) {
  // fp16 / bf16 widen to float exactly (NaN stays NaN); fp64 keeps its own precision.
  using mag_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const auto a0 = rank_key(static_cast<mag_t>(w[0])), a1 = rank_key(static_cast<mag_t>(w[1]));
  const auto a2 = rank_key(static_cast<mag_t>(w[2])), a3 = rank_key(static_cast<mag_t>(w[3]));
  const int code = (a0 >= a1) | ((a0 >= a2) << 1) | ((a0 >= a3) << 2) | ((a1 >= a2) << 3) | ((a1 >= a3) << 4) |
                   ((a2 >= a3) << 5);
  return t.keep[code];
}

template <typename scalar_t>
void compress_rows(const scalar_t* w, scalar_t* vals, uint8_t* meta, bool* mask, int64_t k, int64_t r0, int64_t r1,
                   const std::vector<uint8_t>* tile_rows) {
  const GroupTables& t = group_tables();
  const int64_t groups = k / 4;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const scalar_t* wg = w + r * k + 4 * g;
      const uint8_t bits = tile_rows ? (*tile_rows)[r * groups + g] : top2(wg, t);
      std::memcpy(mask + r * k + 4 * g, &t.mask[bits], 4);
      const int p0 = t.first[bits], p1 = t.second[bits];
      vals[r * 2 * groups + 2 * g] = wg[p0];
      vals[r * 2 * groups + 2 * g + 1] = wg[p1];
      meta[r * groups + g] = static_cast<uint8_t>(p0 | (p1 << 2));
    }
  }
}

// Row masks of the best transposable pattern of every 4x4 tile.
template <typename scalar_t>
std::vector<uint8_t> transposable_rows(const scalar_t* w, int64_t n, int64_t k) {
  const auto& pats = transposable_patterns();
  const int64_t groups = k / 4;
  std::vector<uint8_t> rows(static_cast<size_t>(n * groups));
  at::parallel_for(0, n / 4, 16, [&](int64_t b, int64_t e) {
    for (int64_t tr = b; tr < e; ++tr) {
      for (int64_t tc = 0; tc < groups; ++tc) {
        double a[4][4];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) a[i][j] = std::abs(static_cast<double>(w[(4 * tr + i) * k + 4 * tc + j]));
        size_t best = 0;
        double best_score = -1.0;
        for (size_t p = 0; p < pats.size(); ++p) {
          double s = 0;
          for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j)
              if ((pats[p][i] >> j) & 1) s += a[i][j];
          // Strict: the first pattern wins ties. A sum holding a NaN beats every number
          // (the documented order), and the first such pattern wins among them.
          if (s > best_score || (std::isnan(s) && !std::isnan(best_score))) {
            best_score = s;
            best = p;
          }
        }
        for (int i = 0; i < 4; ++i) rows[(4 * tr + i) * groups + tc] = pats[best][i];
      }
    }
  });
  return rows;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse24_compress_cpu(const at::Tensor& weight, bool transposable) {
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()), "sparse24_compress: weight must be a floating dtype, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) % 4 == 0,
                    "sparse24_compress: weight must be [N, K] with K divisible by 4, got ", weight.sizes());
  TORCH_CHECK_VALUE(!transposable || weight.size(0) % 4 == 0,
                    "sparse24_compress: transposable 2:4 needs N divisible by 4, got ", weight.size(0));
  TORCH_CHECK_VALUE(weight.device().is_cpu(), "sparse24_compress: the CPU kernel needs a CPU tensor");
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  at::Tensor vals = at::empty({n, k / 2}, w.options());
  at::Tensor meta = at::empty({n, k / 4}, w.options().dtype(at::kByte));
  at::Tensor mask = at::empty({n, k}, w.options().dtype(at::kBool));
  if (w.numel() == 0) return {vals, meta, mask};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "sparse24_compress", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    std::vector<uint8_t> tiles;
    if (transposable) tiles = transposable_rows(wp, n, k);
    at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
      compress_rows(wp, vals.data_ptr<scalar_t>(), meta.data_ptr<uint8_t>(), mask.data_ptr<bool>(), k, b, e,
                    transposable ? &tiles : nullptr);
    });
  });
  return {vals, meta, mask};
}

TORCH_LIBRARY_IMPL(sparsekernels_C, CPU, m) { m.impl("sparse24_compress", &sparse24_compress_cpu); }

}  // namespace sparsekernels::cpu
