// The CPU AMX kernel's tiles (sparse24_amx.cpp; a CSR kernel on them was tried, see
// DEVELOPERS.md): the tile configuration, x^T packed into B tiles, and the tile products
// of a task of 32 rows of W against 1-32 rows of x, chunk by chunk of 32 columns of K.
//
// A task's tiles: A0, A1 (the chunk's two 16-row halves of W, 16 rows x 32 bf16), B0, B1
// and C0-C3:
//  - up to 16 rows of x: B0 / B1 x^T of even / odd chunks (16 pairs of K x M), C0 / C1
//    y^T of the two halves over even chunks, C2 / C3 over odd ones (four accumulations in
//    flight; summed at the end);
//  - 17 to 32 rows: B0 / B1 x^T of the chunk for x rows 0-15 / 16-31, C0 / C1 y^T of the
//    halves for rows 0-15, C2 / C3 for rows 16-31.
// Products of bf16 values are exact in fp32 and the tiles accumulate in fp32.
#pragma once

#include "csr_common.h"

#include <algorithm>
#include <cstdint>

#if defined(__linux__) && defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SPARSEKERNELS_AMX 1
#endif

namespace sparsekernels::cpu {

constexpr int kAmxTaskRows = 32;  // rows of W per task: two A tiles
constexpr int kTileRows = 16;
static_assert(kAmxRows <= 2 * kTileRows, "two blocks of x rows at most");

// x2 [M <= kAmxRows, K] (bf16) as B tiles: x^T as pairs of bf16 (one uint32 per two K
// columns), 16 rows of x at a time, [block][kp / 2][16] for kp = K rounded up to
// kAmxChunk: B tile c of a block is its rows [16c, 16c + 16); pairs past K are zero,
// columns past M never read. In workspace slot 0.
const uint32_t* pack_amx_x(const at::Tensor& x2, int64_t kp);

#if defined(SPARSEKERNELS_AMX)

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

  SK_AMX_TARGET AmxTiles(int m, int64_t kp) : two_blocks(m > kTileRows), half(kp / 2 * kTileRows) {
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
  // Chunk c: W's 32 rows at a (bf16, rows `stride` bytes apart) against x^T (pack_amx_x).
  SK_AMX_TARGET void chunk(const uint16_t* a, int64_t stride, const uint32_t* xt, int64_t c) {
    _tile_loadd(SK_TILE_A0, a, stride);
    _tile_loadd(SK_TILE_A1, reinterpret_cast<const char*>(a) + kTileRows * stride, stride);
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

#endif

}  // namespace sparsekernels::cpu
