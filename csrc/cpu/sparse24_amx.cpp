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
//
// A task's tiles: A0, A1 (the chunk's two 16-row halves of W, 16 rows x 32 bf16), B0, B1
// and C0-C3:
//  - up to 16 rows of x: B0 / B1 x^T of even / odd chunks (16 pairs of K x M), C0 / C1
//    y^T of the two halves over even chunks, C2 / C3 over odd ones (four accumulations in
//    flight; summed at the end);
//  - 17 to 32 rows: B0 / B1 x^T of the chunk for x rows 0-15 / 16-31, C0 / C1 y^T of the
//    halves for rows 0-15, C2 / C3 for rows 16-31.
#include "csr_common.h"
#include "sparse24_expand.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#if defined(__linux__) && defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define SPARSEKERNELS_AMX 1
#endif

namespace sparsekernels::cpu {

#if defined(SPARSEKERNELS_AMX)
namespace {

constexpr int kAmxTaskRows = 32;  // rows of W per task: two A tiles
constexpr int kTileRows = 16;
static_assert(kAmxRows <= 2 * kTileRows, "two blocks of x rows at most");

// x2 [M <= kAmxRows, K] (bf16, K a multiple of kAmxChunk) as B tiles: x^T as pairs of
// bf16 (one uint32 per two K columns), 16 rows of x at a time, [block][K / 2][16]: B tile
// c of a block is its rows [16c, 16c + 16) (columns past M never read). In workspace
// slot 0. Block by block, each output row of 16 written whole (ATen's strided copy took
// ~20 us for 8 x 4096), pairs by memcpy (x may be only 2-byte aligned).
const uint32_t* pack_x(const at::Tensor& x2) {
  const int64_t m = x2.size(0), k = x2.size(1), pairs = k / 2, blocks = (m + kTileRows - 1) / kTileRows;
  const at::Tensor xc = x2.contiguous();
  const c10::BFloat16* xb = xc.data_ptr<c10::BFloat16>();
  at::Tensor xt = workspace(0, {blocks, pairs, kTileRows}, at::kInt);
  auto* xp = reinterpret_cast<uint32_t*>(xt.data_ptr<int32_t>());
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t j0 = blk * kTileRows, rows = std::min<int64_t>(kTileRows, m - j0);
      uint32_t* dst = xp + blk * pairs * kTileRows;
      const c10::BFloat16* src = xb + j0 * k;
      for (int64_t p = 0; p < pairs; ++p)
        for (int64_t jj = 0; jj < rows; ++jj) std::memcpy(dst + p * kTileRows + jj, src + jj * k + 2 * p, 4);
    }
  });
  return xp;
}

// The tile configuration LDTILECFG reads (palette 1: 8 tiles of at most 16 rows x 64 bytes).
struct TileConfig {
  uint8_t palette = 0;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

// Tile numbers. Macros, not constants: the tile intrinsics paste their argument into the
// instruction's register name.
#define SK_TILE_C0 0
#define SK_TILE_C1 1
#define SK_TILE_C2 2
#define SK_TILE_C3 3
#define SK_TILE_A0 4
#define SK_TILE_A1 5
#define SK_TILE_B0 6
#define SK_TILE_B1 7

#define SK_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vbmi2,bmi2,popcnt,amx-tile,amx-bf16")))

// LDTILECFG / STTILECFG in asm with the whole 64-byte struct as the memory operand: GCC
// 12's _tile_loadconfig let it drop the stores of rows and colsb before the load (the
// tiles then ran unconfigured: SIGILL at the first TILEZERO).
SK_AMX_TARGET inline void load_tile_config(const TileConfig& c) { __asm__ volatile("ldtilecfg %0" : : "m"(c)); }
SK_AMX_TARGET inline void store_tile_config(TileConfig& c) { __asm__ volatile("sttilecfg %0" : "=m"(c)); }

// The tiles of a task for m rows of x, configured for the scope of one thread's tasks.
// The thread's own configuration is restored afterwards: oneDNN's AMX kernels run on
// these threads too and may count on theirs.
struct AmxTiles {
  alignas(64) TileConfig saved;
  bool two_blocks;
  int64_t half;  // x^T block 1's offset in the packed B tiles (uint32 units)
  // [row][x row] per 16 rows of x; the tiles store only M (or M - 16) columns of each
  // row, the rest stays zero (store_block reads only those columns, the sum all).
  alignas(64) float block[2][kAmxTaskRows * kTileRows] = {};

  SK_AMX_TARGET AmxTiles(int m, int64_t k) : two_blocks(m > kTileRows), half(k / 2 * kTileRows) {
    store_tile_config(saved);
    alignas(64) TileConfig cfg;
    cfg.palette = 1;
    const auto first = static_cast<uint16_t>(4 * std::min(m, kTileRows));
    const auto second = two_blocks ? static_cast<uint16_t>(4 * (m - kTileRows)) : first;
    for (int t = 0; t < 8; ++t) cfg.rows[t] = kTileRows;
    for (int t : {SK_TILE_C0, SK_TILE_C1, SK_TILE_B0}) cfg.colsb[t] = first;
    for (int t : {SK_TILE_C2, SK_TILE_C3, SK_TILE_B1}) cfg.colsb[t] = second;
    for (int t : {SK_TILE_A0, SK_TILE_A1}) cfg.colsb[t] = 64;
    load_tile_config(cfg);
  }
  SK_AMX_TARGET ~AmxTiles() {
    if (saved.palette != 0) load_tile_config(saved);
    else _tile_release();
  }
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;

  SK_AMX_TARGET void zero() {
    _tile_zero(SK_TILE_C0);
    _tile_zero(SK_TILE_C1);
    _tile_zero(SK_TILE_C2);
    _tile_zero(SK_TILE_C3);
  }
  // Chunk c: W's 32 rows decompressed at a [32][32] against x^T (pack_x).
  SK_AMX_TARGET void chunk(const uint16_t (*a)[32], const uint32_t* xt, int64_t c) {
    _tile_loadd(SK_TILE_A0, a[0], 64);
    _tile_loadd(SK_TILE_A1, a[kTileRows], 64);
    const uint32_t* xc = xt + c * kTileRows * kTileRows;
    if (two_blocks) {
      _tile_loadd(SK_TILE_B0, xc, 64);
      _tile_loadd(SK_TILE_B1, xc + half, 64);
      _tile_dpbf16ps(SK_TILE_C0, SK_TILE_A0, SK_TILE_B0);
      _tile_dpbf16ps(SK_TILE_C1, SK_TILE_A1, SK_TILE_B0);
      _tile_dpbf16ps(SK_TILE_C2, SK_TILE_A0, SK_TILE_B1);
      _tile_dpbf16ps(SK_TILE_C3, SK_TILE_A1, SK_TILE_B1);
    } else if ((c & 1) == 0) {
      _tile_loadd(SK_TILE_B0, xc, 64);
      _tile_dpbf16ps(SK_TILE_C0, SK_TILE_A0, SK_TILE_B0);
      _tile_dpbf16ps(SK_TILE_C1, SK_TILE_A1, SK_TILE_B0);
    } else {
      _tile_loadd(SK_TILE_B1, xc, 64);
      _tile_dpbf16ps(SK_TILE_C2, SK_TILE_A0, SK_TILE_B1);
      _tile_dpbf16ps(SK_TILE_C3, SK_TILE_A1, SK_TILE_B1);
    }
  }
  // y^T of the task's rows [r0, r0 + rows) into y (+ bias) through store_block.
  SK_AMX_TARGET void store(int64_t rows, int64_t r0, at::Tensor& y, const at::Tensor* bias) {
    _tile_stored(SK_TILE_C0, block[0], 64);
    _tile_stored(SK_TILE_C1, block[0] + kTileRows * kTileRows, 64);
    _tile_stored(SK_TILE_C2, block[1], 64);
    _tile_stored(SK_TILE_C3, block[1] + kTileRows * kTileRows, 64);
    if (two_blocks) {
      store_block(block[1], kTileRows, rows, 1, r0, y, bias);
    } else {
      for (int i = 0; i < kAmxTaskRows * kTileRows; ++i) block[0][i] += block[1][i];
    }
    store_block(block[0], kTileRows, rows, 0, r0, y, bias);
  }
};

// Linux hands a process the AMX tile state only when asked (arch_prctl, 5.16 and later).
bool request_tile_data() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

// Tasks [t0, t1) of kAmxTaskRows rows of W. xt: pack_x's B tiles. False when some
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
      tiles.chunk(ac, xt, c);
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
  const uint32_t* xp = pack_x(x2);
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
