// The CPU 2:4 product of a few bf16 rows on AMX (Intel Sapphire Rapids and later):
// y [M, N] = x [M, K] W^T for kAmxMinRows <= M <= kAmxRows, K a multiple of kAmxChunk.
//
// Why: with fp32 FMAs (or AVX512-BF16 dot products) against x's values picked by permutes,
// a decode-sized 2:4 product costs a permute and a multiply per 16-32 MACs and grows with
// M (4096 x 4096, 8 rows: 1.85 ms), while oneDNN's dense bf16 GEMM on AMX costs about the
// same for 8 rows as for 1 (1.15-1.3 ms: the 32 MiB weight streamed once). Here the
// weight streams once too, at a little over half the bytes: each 16 x 32 tile of W is
// decompressed into an L1 buffer (vpexpandw puts a row's 16 kept values of 8 groups at
// their positions; the mask comes from the 8 meta bytes through a table and pext) and
// multiplied by TDPBF16PS with a tile of x^T, M columns wide. The decompression costs the
// same for every M: 0.82-0.83 ms for 3 to 8 rows, 0.95-1.0 for 16; 17-32 rows (two blocks
// of x, four more tile products per chunk) 1.2-1.4 ms against oneDNN's 1.5-1.6 in a
// slower hour, where the panels took 6.2-7.0 ms.
//
// Products of bf16 values are exact in fp32 and the tiles accumulate in fp32, as the
// other steps do, in another order.
#include "amx_tiles.h"
#include "csr_common.h"
#include "sparse24_expand.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#if defined(SPARSEKERNELS_AMX)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace sparsekernels::cpu {

const uint32_t* pack_amx_x(const at::Tensor& x2, int64_t kp) {
  const int64_t m = x2.size(0), k = x2.size(1), pairs = kp / 2, blocks = (m + kTileRows - 1) / kTileRows;
  const at::Tensor xc = x2.contiguous();
  const c10::BFloat16* xb = xc.data_ptr<c10::BFloat16>();
  at::Tensor xt = workspace(0, {blocks, pairs, kTileRows}, at::kInt);
  auto* xp = reinterpret_cast<uint32_t*>(xt.data_ptr<int32_t>());
  // Block by block, each output row of 16 written whole (ATen's strided copy took ~20 us
  // for 8 x 4096); whole pairs by memcpy (x may be only 2-byte aligned), the last of an
  // odd K and those past it zero.
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t j0 = blk * kTileRows, rows = std::min<int64_t>(kTileRows, m - j0);
      uint32_t* dst = xp + blk * pairs * kTileRows;
      const c10::BFloat16* src = xb + j0 * k;
      const int64_t whole = k / 2;
      for (int64_t p = 0; p < whole; ++p)
        for (int64_t jj = 0; jj < rows; ++jj) std::memcpy(dst + p * kTileRows + jj, src + jj * k + 2 * p, 4);
      for (int64_t p = whole; p < pairs; ++p)
        for (int64_t jj = 0; jj < rows; ++jj) {
          uint16_t low = 0;
          if (2 * p < k) std::memcpy(&low, src + jj * k + 2 * p, 2);
          dst[p * kTileRows + jj] = low;
        }
    }
  });
  return xp;
}

#if defined(SPARSEKERNELS_AMX)
namespace {

// Linux hands a process the AMX tile state only when asked (arch_prctl, 5.16 and later).
bool request_tile_data() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

// Tasks [t0, t1) of kAmxTaskRows rows of W. xt: pack_amx_x's B tiles. False when some
// task's meta was invalid (its rows of y are then left unwritten).
SK_AMX_TARGET bool amx_tasks(const uint32_t* xt, int m, const uint16_t* vals, const uint8_t* meta, int64_t groups,
                             int64_t n, int64_t t0, int64_t t1, at::Tensor& y, const at::Tensor* bias) {
  AmxTiles tiles(m, 4 * groups);
  // A chunk's 32 rows, decompressed into a[chunk & 1] while the tiles read the other.
  alignas(64) uint16_t a[2][kAmxTaskRows][32];
  const int64_t chunks = groups / 8;
  // Values are read 32 bytes per row and chunk, from 32 rows at once: the prefetcher
  // does not follow that many streams, so each row's line two lines ahead is asked for.
  constexpr int64_t kAhead = 128;
  uint64_t bad = 0;
  for (int64_t task = t0; task < t1 && bad == 0; ++task) {
    const int64_t r0 = task * kAmxTaskRows, r1 = std::min(n, r0 + kAmxTaskRows);
    const int rows = static_cast<int>(r1 - r0);
    // The last task's missing rows.
    for (auto& buf : a) std::memset(buf[rows], 0, sizeof(buf[0]) * (kAmxTaskRows - rows));
    tiles.zero();
    for (int64_t c = 0; c < chunks; ++c) {
      uint16_t(*ac)[32] = a[c & 1];
      for (int i = 0; i < rows; ++i) {
        const uint16_t* v = vals + (r0 + i) * 2 * groups + 16 * c;
        if ((c & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(v) + kAhead, _MM_HINT_T0);
        bad |= expand24(v, meta + (r0 + i) * groups + 8 * c, ac[i]);  // checks the meta (sparse24_expand.h)
      }
      tiles.chunk(ac[0], 64, xt, c);
    }
    if (bad == 0) tiles.store(rows, r0, y, bias);
  }
  return bad == 0;
}

}  // namespace

bool cpu_has_amx_bf16() {
  static const bool has = cpu_has_expand24() && __builtin_cpu_supports("amx-tile") &&
                          __builtin_cpu_supports("amx-bf16") && request_tile_data();
  return has;
}

bool sparse24_amx(const at::Tensor& x2, at::Tensor& y, const at::Tensor& vals, const at::Tensor& meta,
                  const at::Tensor* bias) {
  const int64_t m = x2.size(0), k = x2.size(1), n = y.size(1), groups = k / 4;
  TORCH_INTERNAL_ASSERT(m >= 1 && m <= kAmxRows && k % kAmxChunk == 0 && x2.scalar_type() == at::kBFloat16 &&
                        vals.scalar_type() == at::kBFloat16 && vals.is_contiguous());
  const uint32_t* xp = pack_amx_x(x2, k);
  const auto* vp = reinterpret_cast<const uint16_t*>(vals.data_ptr<c10::BFloat16>());
  const uint8_t* mp = meta.data_ptr<uint8_t>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, (n + kAmxTaskRows - 1) / kAmxTaskRows, 1, [&](int64_t begin, int64_t end) {
    if (!amx_tasks(xp, static_cast<int>(m), vp, mp, groups, n, begin, end, y, bias)) ok = false;
  });
  return ok.load();
}

#else

bool cpu_has_amx_bf16() { return false; }

bool sparse24_amx(const at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor*) {
  TORCH_INTERNAL_ASSERT(false, "sparse24_amx: not built for this platform");
  return false;
}

#endif

}  // namespace sparsekernels::cpu
