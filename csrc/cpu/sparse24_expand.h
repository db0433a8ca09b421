// Decompressing 2:4 rows: a row's kept values (two per group of 4, in group order) put
// at their positions, zeros elsewhere. With AVX-512 one vpexpandw (VBMI2) writes 8 groups
// of 16-bit values, one vpexpandd 4 groups of fp32; the expand's lane mask comes from the
// groups' meta bytes through a 16-entry table (byte i0 | i1 << 2 -> nibble 1 << i0 |
// 1 << i1) and pext. Used by the AMX product (tiles of W) and by the dense-GEMM variant of
// the 2:4 product (the whole weight).
//
// Each function returns 0 where its meta bytes are valid and nonzero otherwise, and never
// reads past the values of its own groups whatever the bytes hold: an invalid code maps
// to an empty nibble (the expand then reads fewer values; a valid chunk's mask has exactly
// two bits per group, one popcount away), and bits 4-7, which the table lookup ignores,
// are checked on the bytes.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SPARSEKERNELS_EXPAND24 1
#endif

namespace sparsekernels::cpu {

// One group of any dtype: 4 values at dst from the 2 at vals; nonzero for an invalid byte.
template <typename scalar_t>
inline uint32_t expand24_group(const scalar_t* vals, uint8_t code, scalar_t* dst) {
  const int i0 = code & 3, i1 = (code >> 2) & 3;
  for (int i = 0; i < 4; ++i) dst[i] = scalar_t(0);
  dst[i0] = vals[0];
  dst[i1] = vals[1];  // an invalid byte still writes inside the group
  return static_cast<uint32_t>((code >> 4) | (i0 >= i1 ? 1 : 0));
}

#if defined(SPARSEKERNELS_EXPAND24)
#define SK_EXPAND24_TARGET __attribute__((target("avx512f,avx512bw,avx512vbmi2,bmi2,popcnt"), always_inline)) inline

// The lane mask of the groups whose meta bytes are `bytes` (the nibbles in nibble_bits).
SK_EXPAND24_TARGET uint64_t expand24_mask(uint64_t bytes, uint64_t nibble_bits) {
  // Codes 4 (0, 1), 8 (0, 2), 9 (1, 2), 12 (0, 3), 13 (1, 3), 14 (2, 3); others -> 0.
  const __m128i lut = _mm_setr_epi8(0, 0, 0, 0, 0x3, 0, 0, 0, 0x5, 0x6, 0, 0, 0x9, 0xA, 0xC, 0);
  const __m128i nibbles = _mm_shuffle_epi8(lut, _mm_cvtsi64_si128(static_cast<long long>(bytes)));
  return _pext_u64(static_cast<uint64_t>(_mm_cvtsi128_si64(nibbles)), nibble_bits);
}

// One vector of groups: 16-bit values (bf16, fp16; T = uint16_t): 8 groups, 32 values at
// dst from the 16 at vals; fp32 (T = float): 4 groups, 16 from 8.
template <typename T>
SK_EXPAND24_TARGET uint64_t expand24(const T* vals, const uint8_t* meta, T* dst) {
  static_assert(std::is_same_v<T, uint16_t> || std::is_same_v<T, float>, "16-bit or fp32 values");
  constexpr int kGroups = 64 / sizeof(T) / 4;
  uint64_t bytes = 0;
  std::memcpy(&bytes, meta, kGroups);
  const uint64_t mask = expand24_mask(bytes, 0x0F0F0F0F0F0F0F0FULL >> (64 - 8 * kGroups));
  if constexpr (sizeof(T) == 2) {
    _mm512_storeu_si512(dst, _mm512_maskz_expandloadu_epi16(static_cast<__mmask32>(mask), vals));
  } else {
    _mm512_storeu_ps(dst, _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(mask), vals));
  }
  return (bytes & 0xF0F0F0F0F0F0F0F0ULL) | static_cast<uint64_t>(_mm_popcnt_u64(mask) ^ (2 * kGroups));
}

#undef SK_EXPAND24_TARGET
#define SK_EXPAND24_ROW_TARGET __attribute__((target("avx512f,avx512bw,avx512vbmi2,bmi2,popcnt"))) inline

// Groups [0, whole) of a row (whole a multiple of expand24's groups per vector).
template <typename T>
SK_EXPAND24_ROW_TARGET uint64_t expand24_row(const T* vals, const uint8_t* meta, T* dst, int64_t whole) {
  constexpr int kGroups = 64 / sizeof(T) / 4;
  uint64_t bad = 0;
  for (int64_t g = 0; g < whole; g += kGroups) bad |= expand24(vals + 2 * g, meta + g, dst + 4 * g);
  return bad;
}

#undef SK_EXPAND24_ROW_TARGET
#endif

// Whether the CPU runs the expand functions (AVX-512 F / BW / VBMI2, BMI2, POPCNT), and
// (expand24_active) the kernels are at the AVX-512 level: tests force the group-by-group
// loop through a lower one.
bool cpu_has_expand24();
bool expand24_active();

}  // namespace sparsekernels::cpu
