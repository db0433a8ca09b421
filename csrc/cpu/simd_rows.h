// The fp32 row kernels for each instruction set (RowsAvx512, RowsAvx2: simd_rows.inc
// compiled once per set; RowsAvx512Bf16 for the 2:4 few-rows kernel's bf16 step) and
// with_simd_rows, which picks the set this CPU runs.
#pragma once

#include "csr_common.h"
#include "simd_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace sparsekernels::cpu {

#if defined(SPARSEKERNELS_X86_SIMD)
#define SK_ROWS_NAME RowsAvx512
#define SK_ROWS_OPS Avx512
#define SK_ROWS_TARGET __attribute__((target("avx512f")))
#include "simd_rows.inc"
#undef SK_ROWS_NAME
#undef SK_ROWS_OPS
#undef SK_ROWS_TARGET

// Only rows24_few's bf16 dot step uses what this target adds; the other kernels of this
// set are never instantiated.
#define SK_ROWS_NAME RowsAvx512Bf16
#define SK_ROWS_OPS Avx512Bf16
#define SK_ROWS_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))
#include "simd_rows.inc"
#undef SK_ROWS_NAME
#undef SK_ROWS_OPS
#undef SK_ROWS_TARGET

#define SK_ROWS_NAME RowsAvx2
#define SK_ROWS_OPS Avx2
#define SK_ROWS_TARGET __attribute__((target("avx2,fma")))
#include "simd_rows.inc"
#undef SK_ROWS_NAME
#undef SK_ROWS_OPS
#undef SK_ROWS_TARGET
#endif

// Calls f(Rows{}) with the row kernels of simd_level() (RowsAvx512 or RowsAvx2) and
// returns true, or returns false where there are none (the portable loops then run).
// f calls a kernel as decltype(rows)::template spmm<T>(...).
template <typename F>
bool with_simd_rows(F&& f) {
#if defined(SPARSEKERNELS_X86_SIMD)
  switch (simd_level()) {
    case SimdLevel::kAvx512:
      f(RowsAvx512{});
      return true;
    case SimdLevel::kAvx2:
      f(RowsAvx2{});
      return true;
    case SimdLevel::kGeneric:
      break;
  }
#endif
  return false;
}

}  // namespace sparsekernels::cpu
