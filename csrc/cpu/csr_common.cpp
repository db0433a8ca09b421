#include "csr_common.h"
#include "sparse24_expand.h"

#include <c10/util/Exception.h>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sparsekernels::cpu {

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    long v = -1;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? static_cast<int64_t>(v) : int64_t(1) << 20;
  }();
  return bytes;
}

bool panel_fits_l2(int64_t rows, int64_t t, int64_t elem_bytes) {
  const int64_t budget = std::max<int64_t>(l2_cache_bytes() / 4 * 3, int64_t(1) << 20);
  return rows * t * elem_bytes <= budget;
}

namespace {
std::atomic<int64_t> forced_panel_width{0};  // 0: the rule below
}  // namespace

void force_panel_width(int64_t t) {
  TORCH_CHECK_VALUE(t == 0 || t == kNarrowPanel || t == kMidPanel || t == kWidePanel,
                    "cpu_force_panel_width: width must be 0 (the CPU's rule), 16, 32 or 64, got ", t);
  forced_panel_width.store(t, std::memory_order_relaxed);
}

int64_t widest_panel() { return simd_level() == SimdLevel::kAvx512 ? kWidePanel : kMidPanel; }

int64_t choose_panel(int64_t m) {
  return m <= kNarrowPanel ? kNarrowPanel : std::min(widest_panel(), m <= kMidPanel ? kMidPanel : kWidePanel);
}

namespace {
int64_t csr_panel_rule(int64_t gathered_rows, int64_t elem_bytes) {
  if (cpu_is_amd()) {
    return gathered_rows * kMidPanel * elem_bytes <= 2 * l2_cache_bytes() ? kMidPanel : kNarrowPanel;
  }
  if (widest_panel() == kWidePanel && panel_fits_l2(gathered_rows, kWidePanel, elem_bytes)) return kWidePanel;
  if (panel_fits_l2(gathered_rows, kMidPanel, elem_bytes)) return kMidPanel;
  return kNarrowPanel;
}
}  // namespace

int64_t choose_panel(int64_t m, int64_t gathered_rows, int64_t elem_bytes) {
  if (m <= kNarrowPanel) return kNarrowPanel;
  if (const int64_t forced = forced_panel_width.load(std::memory_order_relaxed)) return forced;
  const int64_t rule = csr_panel_rule(gathered_rows, elem_bytes);
  return m <= kMidPanel ? std::min(rule, kMidPanel) : rule;
}

bool cpu_is_amd() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

bool cpu_has_expand24() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("bmi2") &&
                          __builtin_cpu_supports("popcnt");
  return has;
#else
  return false;
#endif
}

bool expand24_active() { return simd_level() == SimdLevel::kAvx512 && cpu_has_expand24(); }

Bf16Step cpu_bf16_step() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // kAmx needs the dot step too: batches the tiles do not take (1-2 rows, K not a multiple
  // of 32) run it. (Real AMX parts have AVX512-BF16; a VM could hide it.)
  static const bool dot = cpu_has_avx512() && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl");
  static const Bf16Step step = !dot ? Bf16Step::kWiden : cpu_has_amx_bf16() ? Bf16Step::kAmx : Bf16Step::kDot;
  return step;
#else
  return Bf16Step::kWiden;
#endif
}

namespace {
std::atomic<int> forced_bf16_step{-1};  // -1: the CPU's best
}  // namespace

Bf16Step bf16_step() {
  if (simd_level() != SimdLevel::kAvx512) return Bf16Step::kWiden;
  const int best = static_cast<int>(cpu_bf16_step()), forced = forced_bf16_step.load(std::memory_order_relaxed);
  return static_cast<Bf16Step>(forced < 0 ? best : std::min(forced, best));
}

void force_bf16_step(std::optional<Bf16Step> step) {
  forced_bf16_step.store(step ? static_cast<int>(*step) : -1, std::memory_order_relaxed);
}

SimdLevel cpu_simd_level() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const SimdLevel level = cpu_has_avx512()                                                 ? SimdLevel::kAvx512
                                 : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? SimdLevel::kAvx2
                                                                                                   : SimdLevel::kGeneric;
  return level;
#else
  return SimdLevel::kGeneric;
#endif
}

namespace {
std::atomic<int> forced_simd_level{-1};  // -1: the CPU's best
}  // namespace

std::atomic<int> detail::active_simd_level{-1};

namespace {
int level_for(int forced) {
  const int best = static_cast<int>(cpu_simd_level());
  return forced < 0 ? best : std::min(forced, best);
}
}  // namespace

SimdLevel detail::init_simd_level() {
  // First use: set only if still unset, so a force_simd_level that ran meanwhile wins.
  int level = level_for(forced_simd_level.load(std::memory_order_relaxed));
  int unset = -1;
  if (!active_simd_level.compare_exchange_strong(unset, level, std::memory_order_relaxed)) level = unset;
  return static_cast<SimdLevel>(level);
}

void force_simd_level(std::optional<SimdLevel> level) {
  const int forced = level ? static_cast<int>(*level) : -1;
  forced_simd_level.store(forced, std::memory_order_relaxed);
  detail::active_simd_level.store(level_for(forced), std::memory_order_relaxed);
}

namespace {
uint32_t max_index_generic(const int32_t* idx, int64_t count) {
  uint32_t hi = 0;
  for (int64_t i = 0; i < count; ++i) hi = std::max(hi, static_cast<uint32_t>(idx[i]));
  return hi;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx512f"))) uint32_t max_index_avx512(const int32_t* idx, int64_t count) {
  __m512i hi = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 16 <= count; i += 16)
    hi = _mm512_max_epu32(hi, _mm512_loadu_si512(reinterpret_cast<const void*>(idx + i)));
  return std::max(_mm512_reduce_max_epu32(hi), max_index_generic(idx + i, count - i));
}
#endif
}  // namespace

bool indices_in_range(const int32_t* idx, int64_t count, int64_t bound) {
  if (count <= 0) return true;
  if (bound <= 0) return false;
  uint32_t hi;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (simd_level() == SimdLevel::kAvx512) hi = max_index_avx512(idx, count);
  else
#endif
    hi = max_index_generic(idx, count);
  return static_cast<int64_t>(hi) < bound;
}

void columns_out_of_range(const char* what, int64_t n_cols) {
  TORCH_CHECK_VALUE(false, what, ": col_idx entries must lie in [0, ", n_cols, ")");
  std::abort();  // not reached: TORCH_CHECK_VALUE(false, ...) throws
}

void check_csr_columns(const char* what, const at::Tensor& col_idx, int64_t n_cols) {
  const at::Tensor ci = col_idx.contiguous();
  const int32_t* c = ci.data_ptr<int32_t>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, ci.numel(), 1 << 16, [&](int64_t b, int64_t e) {
    if (!indices_in_range(c + b, e - b, n_cols)) ok = false;
  });
  if (!ok.load()) columns_out_of_range(what, n_cols);
}

void check_csr(const char* what, const at::Tensor& values, const at::Tensor& row_ptr,
               const at::Tensor& col_idx, int64_t n_rows, int64_t n_cols, bool check_columns) {
  TORCH_CHECK_VALUE(values.dim() == 1, what, ": values must be 1-D [nnz], got shape ",
                    values.sizes());
  TORCH_CHECK_VALUE(row_ptr.dim() == 1 && col_idx.dim() == 1, what,
                    ": row_ptr and col_idx must be 1-D, got shapes ", row_ptr.sizes(), " and ",
                    col_idx.sizes());
  TORCH_CHECK_TYPE(row_ptr.scalar_type() == at::kInt && col_idx.scalar_type() == at::kInt, what,
                   ": row_ptr and col_idx must be int32, got ", row_ptr.scalar_type(), " and ",
                   col_idx.scalar_type());
  TORCH_CHECK_VALUE(values.device().is_cpu() && row_ptr.device().is_cpu() &&
                        col_idx.device().is_cpu(),
                    what, ": the CPU kernel needs values, row_ptr and col_idx on the CPU");
  TORCH_CHECK_VALUE(row_ptr.numel() >= 1, what, ": row_ptr must have rows + 1 >= 1 entries, got none");
  TORCH_CHECK_VALUE(row_ptr.numel() == n_rows + 1, what, ": row_ptr must have ", n_rows + 1,
                    " entries (rows + 1), got ", row_ptr.numel());
  const int64_t nnz = values.numel();
  TORCH_CHECK_VALUE(col_idx.numel() == nnz, what, ": col_idx has ", col_idx.numel(),
                    " entries but values has ", nnz);
  TORCH_CHECK_VALUE(nnz <= INT32_MAX, what, ": nnz = ", nnz, " does not fit int32 indices");

  const at::Tensor rp = row_ptr.contiguous();
  const at::Tensor ci = col_idx.contiguous();
  const int32_t* r = rp.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(r[0] == 0 && r[n_rows] == nnz, what, ": row_ptr must start at 0 and end at nnz = ",
                    nnz, ", got ", r[0], " and ", r[n_rows]);
  // A corrupt pattern is an error, never an out-of-bounds read: row_ptr here, the column
  // indices here or (check_columns == false) by the caller's kernel, task by task.
  std::atomic<bool> ok_rows{true};
  at::parallel_for(0, n_rows, 4096, [&](int64_t b, int64_t e) {
    bool ok = true;
    for (int64_t i = b; i < e; ++i) ok &= r[i] <= r[i + 1];
    if (!ok) ok_rows = false;
  });
  TORCH_CHECK_VALUE(ok_rows.load(), what, ": row_ptr must be non-decreasing");
  if (check_columns) check_csr_columns(what, ci, n_cols);
}

void check_dense(const char* what, const char* arg, const at::Tensor& x, at::ScalarType dtype,
                 int64_t k) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), what, ": ", arg, " must be on the CPU, got ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == dtype, what, ": ", arg, " has dtype ", x.scalar_type(),
                   " but values has dtype ", dtype);
  TORCH_CHECK_VALUE(x.dim() >= 1, what, ": ", arg, " must have at least 1 dimension");
  TORCH_CHECK_VALUE(x.size(-1) == k, what, ": ", arg, " must have last dimension ", k, ", got shape ",
                    x.sizes());
}

void check_same_batch(const char* what, const at::Tensor& dy, const at::Tensor& x) {
  TORCH_CHECK_VALUE(dy.sizes().slice(0, dy.dim() - 1) == x.sizes().slice(0, x.dim() - 1), what,
                    ": dy and x must have the same leading (batch) dimensions, got ", dy.sizes(), " and ", x.sizes());
}

at::Tensor checked_bias(const char* what, const std::optional<at::Tensor>& bias, at::ScalarType dtype, int64_t n) {
  if (!bias.has_value()) return at::Tensor();
  check_dense(what, "bias", *bias, dtype, n);
  TORCH_CHECK_VALUE(bias->dim() == 1, what, ": bias must be 1-D [", n, "], got shape ", bias->sizes());
  return bias->contiguous();
}

namespace {
std::array<at::Tensor, kWorkspaceSlots>& thread_buffers() {
  thread_local std::array<at::Tensor, kWorkspaceSlots> buffers;
  return buffers;
}
}  // namespace

void check_sparse24(const char* what, const at::Tensor& values, const at::Tensor& meta) {
  TORCH_CHECK_TYPE(at::isFloatingType(values.scalar_type()), what, ": values must be a floating dtype, got ",
                   values.scalar_type());
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kByte, what, ": meta must be uint8, got ", meta.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 2 && meta.dim() == 2 && values.size(0) == meta.size(0) &&
                        values.size(1) == 2 * meta.size(1),
                    what, ": values [N, K/2] and meta [N, K/4] do not match: ", values.sizes(), " and ", meta.sizes());
  TORCH_CHECK_VALUE(values.device().is_cpu() && meta.device().is_cpu(), what, ": the CPU kernel needs CPU tensors");
}

at::Tensor workspace(int slot, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_INTERNAL_ASSERT(slot >= 0 && slot < kWorkspaceSlots);
  auto& buffers = thread_buffers();
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  at::Tensor& buf = buffers[slot];
  if (!buf.defined() || buf.numel() < bytes) {
    buf = at::Tensor();  // free the old one first: peak memory is one buffer, not two
    buf = at::empty({std::max<int64_t>(bytes, 64)}, at::TensorOptions().dtype(at::kByte));
  }
  return buf.narrow(0, 0, bytes).view(dtype).view(shape);
}

void release_workspace() {
  for (auto& buf : thread_buffers()) buf = at::Tensor();
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// dst[c][r] = src[r][c] for a 16 x 16 fp32 tile, in registers: 64 shuffles for 256
// elements. A scalar blocked transpose ran at ~1 ns per element here, as slow as the
// sparse kernel itself at 99% sparsity.
__attribute__((target("avx512f"))) void transpose16x16(const float* src, int64_t ss, float* dst,
                                                       int64_t ds, const float* add) {
  __m512 r[16], t[16], u[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ss);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4g + c], lane L = column 4L + c of rows 4g .. 4g+3.
  for (int g = 0; g < 4; ++g) {
    const __m512d lo01 = _mm512_castps_pd(t[4 * g]), hi01 = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d lo23 = _mm512_castps_pd(t[4 * g + 2]), hi23 = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo01, lo23));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo01, lo23));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi01, hi23));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi01, hi23));
  }
  // add (the bias of the 16 output columns) goes into every stored row. Without it the
  // rows are stored as they are: adding zeros would turn -0 into +0.
  const bool has_add = add != nullptr;
  const __m512 a = has_add ? _mm512_loadu_ps(add) : _mm512_setzero_ps();
  for (int c = 0; c < 4; ++c) {
    const __m512 s0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
    const __m512 s1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 s2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 s3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    const __m512 o0 = _mm512_shuffle_f32x4(s0, s2, 0x88), o8 = _mm512_shuffle_f32x4(s0, s2, 0xDD);
    const __m512 o4 = _mm512_shuffle_f32x4(s1, s3, 0x88), o12 = _mm512_shuffle_f32x4(s1, s3, 0xDD);
    _mm512_storeu_ps(dst + (c)*ds, has_add ? _mm512_add_ps(o0, a) : o0);
    _mm512_storeu_ps(dst + (8 + c) * ds, has_add ? _mm512_add_ps(o8, a) : o8);
    _mm512_storeu_ps(dst + (4 + c) * ds, has_add ? _mm512_add_ps(o4, a) : o4);
    _mm512_storeu_ps(dst + (12 + c) * ds, has_add ? _mm512_add_ps(o12, a) : o12);
  }
}

// The same 16 x 16 tile with AVX2, as four 8 x 8 transposes (24 shuffles each): dst's
// 8 x 8 block (cb, rb) is src's block (rb, cb) transposed, plus add[8 rb, 8 rb + 8).
__attribute__((target("avx2"))) void transpose16x16_avx2(const float* src, int64_t ss, float* dst, int64_t ds,
                                                         const float* add) {
  for (int rb = 0; rb < 2; ++rb) {
    for (int cb = 0; cb < 2; ++cb) {
      const float* s = src + 8 * rb * ss + 8 * cb;
      __m256 r[8], t[8], u[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * ss);
      for (int i = 0; i < 4; ++i) {  // pairs of rows interleaved
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      for (int g = 0; g < 2; ++g) {  // u[4g + c], 128-bit lane h = column 4h + c of rows 4g .. 4g+3
        u[4 * g + 0] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
        u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
        u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
        u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
      }
      // As transpose16x16: no add, the rows stored as they are (adding zeros would turn
      // -0 into +0).
      const bool has_add = add != nullptr;
      const __m256 a = has_add ? _mm256_loadu_ps(add + 8 * rb) : _mm256_setzero_ps();
      float* d = dst + 8 * cb * ds + 8 * rb;
      for (int c = 0; c < 4; ++c) {
        const __m256 lo = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);  // column c
        const __m256 hi = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);  // column 4 + c
        _mm256_storeu_ps(d + c * ds, has_add ? _mm256_add_ps(lo, a) : lo);
        _mm256_storeu_ps(d + (4 + c) * ds, has_add ? _mm256_add_ps(hi, a) : hi);
      }
    }
  }
}
constexpr bool kHaveTranspose16 = true;
#else
void transpose16x16(const float*, int64_t, float*, int64_t, const float*) {}
void transpose16x16_avx2(const float*, int64_t, float*, int64_t, const float*) {}
constexpr bool kHaveTranspose16 = false;
#endif

namespace {

// dst[c * ds + r] = src[r * ss0 + c * ss1] (+ add[r] when add is given) for r < rows,
// c < cols (any sizes, converting; the sum is taken in the source's precision).
template <typename in_t, typename out_t>
inline void transpose_tile(const in_t* src, int64_t ss0, int64_t ss1, out_t* dst, int64_t ds,
                           int64_t rows, int64_t cols, const out_t* add = nullptr) {
  if constexpr (std::is_same_v<in_t, float> && std::is_same_v<out_t, float>) {
    if (kHaveTranspose16 && rows == 16 && cols == 16 && ss1 == 1 && simd_level() != SimdLevel::kGeneric) {
      if (simd_level() == SimdLevel::kAvx512) transpose16x16(src, ss0, dst, ds, add);
      else transpose16x16_avx2(src, ss0, dst, ds, add);
      return;
    }
  }
  if (add != nullptr) {
    for (int64_t r = 0; r < rows; ++r) {
      const in_t a = static_cast<in_t>(add[r]);
      for (int64_t c = 0; c < cols; ++c) dst[c * ds + r] = static_cast<out_t>(src[r * ss0 + c * ss1] + a);
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ds + r] = static_cast<out_t>(src[r * ss0 + c * ss1]);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// sums[c] += sum over the 16 rows of src[r * ss + c], c < 16 (rows added in order, then
// into sums).
__attribute__((target("avx512f"))) void add_column_sums16(const float* src, int64_t ss, float* sums) {
  __m512 acc = _mm512_loadu_ps(src);
  for (int r = 1; r < 16; ++r) acc = _mm512_add_ps(acc, _mm512_loadu_ps(src + r * ss));
  _mm512_storeu_ps(sums, _mm512_add_ps(_mm512_loadu_ps(sums), acc));
}

// The same with AVX2: each 8-column half in the same order.
__attribute__((target("avx2"))) void add_column_sums16_avx2(const float* src, int64_t ss, float* sums) {
  for (int h = 0; h < 16; h += 8) {
    __m256 acc = _mm256_loadu_ps(src + h);
    for (int r = 1; r < 16; ++r) acc = _mm256_add_ps(acc, _mm256_loadu_ps(src + r * ss + h));
    _mm256_storeu_ps(sums + h, _mm256_add_ps(_mm256_loadu_ps(sums + h), acc));
  }
}
#else
void add_column_sums16(const float*, int64_t, float*) {}
void add_column_sums16_avx2(const float*, int64_t, float*) {}
#endif

// sums[c] += sum over r < rows of src[r * ss0 + c * ss1], c < cols: the rows are added in
// order, then into sums (the same order on every path). The tile was just read by the
// transpose, so its rows come from L1.
template <typename in_t, typename out_t>
inline void add_column_sums(const in_t* src, int64_t ss0, int64_t ss1, int64_t rows, int64_t cols, out_t* sums) {
  if constexpr (std::is_same_v<in_t, float> && std::is_same_v<out_t, float>) {
    if (kHaveTranspose16 && rows == 16 && cols == 16 && ss1 == 1 && simd_level() != SimdLevel::kGeneric) {
      if (simd_level() == SimdLevel::kAvx512) add_column_sums16(src, ss0, sums);
      else add_column_sums16_avx2(src, ss0, sums);
      return;
    }
  }
  for (int64_t c = 0; c < cols; ++c) {
    if (rows == 0) break;
    out_t acc = static_cast<out_t>(src[c * ss1]);
    for (int64_t r = 1; r < rows; ++r) acc += static_cast<out_t>(src[r * ss0 + c * ss1]);
    sums[c] += acc;
  }
}

// Columns [k0, k1) of panel p of x [m, k] (strides xs0, xs1) into panel [k, t]; their
// column sums (the panel's rows in order) into sums[k0, k1) when sums is given.
template <typename in_t, typename out_t>
void pack_panel_columns(const in_t* src, int64_t xs0, int64_t xs1, int64_t m, int64_t t, int64_t p, int64_t k0,
                        int64_t k1, out_t* panel, out_t* sums) {
  if (sums) std::fill(sums + k0, sums + k1, out_t(0));
  for (int64_t j0 = 0; j0 < t; j0 += 16) {
    const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(16, m - (p * t + j0)));
    for (int64_t kk = k0; kk < k1; kk += 16) {
      const int64_t cols = std::min<int64_t>(16, k1 - kk);
      if (rows > 0) {  // (a padding tile has no rows of x to point at)
        const in_t* tile = src + (p * t + j0) * xs0 + kk * xs1;
        transpose_tile(tile, xs0, xs1, panel + kk * t + j0, t, rows, cols);
        if (sums) add_column_sums(tile, xs0, xs1, rows, cols, sums + kk);
      }
      for (int64_t c = 0; c < cols; ++c)  // padding rows of the last panel
        for (int64_t r = rows; r < 16; ++r) panel[(kk + c) * t + j0 + r] = out_t(0);
    }
  }
}

template <typename in_t, typename out_t>
void pack_impl(const at::Tensor& x, at::Tensor& out, int64_t t, out_t* col_sums) {
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t p_count = out.size(0);
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  const in_t* src = x.data_ptr<in_t>();
  out_t* dst = out.data_ptr<out_t>();
  constexpr int64_t kb = 64;
  const int64_t k_blocks = (k + kb - 1) / kb;
  at::parallel_for(0, p_count * k_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / k_blocks, k0 = (task % k_blocks) * kb;
      // This task owns columns [k0, k1) of panel p's sums: no two threads share one.
      pack_panel_columns(src, xs0, xs1, m, t, p, k0, std::min(k, k0 + kb), dst + p * k * t,
                         col_sums ? col_sums + p * k : nullptr);
    }
  });
}

template <typename in_t, typename out_t>
void store_block_impl(const in_t* block, int64_t t, int64_t rows, int64_t p, int64_t r0, out_t* y, int64_t m,
                      int64_t n, const out_t* bias) {
  for (int64_t j0 = 0; j0 < t; j0 += 16) {
    const int64_t cols = std::min<int64_t>(16, m - (p * t + j0));  // batch rows left
    if (cols <= 0) break;
    for (int64_t rr = 0; rr < rows; rr += 16) {
      // block[rr + r][j0 + c] (+ bias[r0 + rr + r]) -> y[p*t + j0 + c][r0 + rr + r]
      transpose_tile(block + rr * t + j0, t, int64_t(1), y + (p * t + j0) * n + r0 + rr, n,
                     std::min<int64_t>(16, rows - rr), cols, bias ? bias + r0 + rr : nullptr);
    }
  }
}

template <typename in_t>
void store_block_any(const in_t* block, int64_t t, int64_t rows, int64_t p, int64_t r0, at::Tensor& y,
                     const at::Tensor* bias) {
  const int64_t m = y.size(0), n = y.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "store_block", [&] {
    store_block_impl<in_t, scalar_t>(block, t, rows, p, r0, y.data_ptr<scalar_t>(), m, n,
                                     bias ? bias->data_ptr<scalar_t>() : nullptr);
  });
}

}  // namespace

at::Tensor pack_panels(const at::Tensor& x, int64_t panel, at::ScalarType compute, int slot, at::Tensor* col_sums) {
  TORCH_INTERNAL_ASSERT(x.dim() == 2);
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t p_count = (m + panel - 1) / panel;
  TORCH_INTERNAL_ASSERT(!col_sums || (col_sums->is_contiguous() && col_sums->scalar_type() == compute &&
                                      col_sums->numel() == p_count * k));
  at::Tensor out = workspace(slot, {p_count, k, panel}, compute);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pack_panels", [&] {
    using in_t = scalar_t;
    if (compute == at::kDouble) {
      pack_impl<in_t, double>(x, out, panel, col_sums ? col_sums->data_ptr<double>() : nullptr);
    } else {
      pack_impl<in_t, float>(x, out, panel, col_sums ? col_sums->data_ptr<float>() : nullptr);
    }
  });
  return out;
}

template <typename out_t>
void pack_one_panel(const at::Tensor& x, int64_t t, int64_t p, out_t* panel, out_t* col_sums, int64_t c0,
                    int64_t c1) {
  TORCH_INTERNAL_ASSERT(x.dim() == 2);
  const int64_t m = x.size(0);
  if (c1 < 0) c1 = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pack_one_panel", [&] {
    // The same 64-column steps as pack_panels, so the column sums come out bit for bit alike.
    for (int64_t k0 = c0; k0 < c1; k0 += 64)
      pack_panel_columns(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), m, t, p, k0, std::min(c1, k0 + 64), panel,
                         col_sums);
  });
}
template void pack_one_panel<float>(const at::Tensor&, int64_t, int64_t, float*, float*, int64_t, int64_t);
template void pack_one_panel<double>(const at::Tensor&, int64_t, int64_t, double*, double*, int64_t, int64_t);

at::Tensor values_in(const at::Tensor& vals, at::ScalarType ct) {
  if (vals.scalar_type() == ct && vals.is_contiguous()) return vals;
  at::Tensor out = workspace(2, vals.sizes(), ct);
  out.copy_(vals);
  return out;
}

at::Tensor few_rows_values(const at::Tensor& vals) {
  return vals.scalar_type() == at::kBFloat16 ? vals.contiguous() : values_in(vals, at::kFloat);
}

const float* few_rows_operand(const at::Tensor& x, bool transposed, at::Tensor& holder, int slot) {
  TORCH_INTERNAL_ASSERT(x.dim() == 2);
  const int64_t m = x.size(0), k = x.size(1);
  // One row is its own transpose.
  const bool usable = x.scalar_type() == at::kFloat &&
                      (m == 1 ? x.stride(1) == 1 || k <= 1
                              : (transposed ? x.stride(0) == 1 && x.stride(1) == m : x.is_contiguous()));
  if (usable) return x.data_ptr<float>();
  holder = transposed ? workspace(slot, {k, m}, at::kFloat) : workspace(slot, {m, k}, at::kFloat);
  holder.copy_(transposed ? x.t() : x);
  return holder.data_ptr<float>();
}

int64_t parallel_chunks(int64_t tasks) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
}

bool chunks_pack_own_panels(int64_t p_count, int64_t tasks) { return p_count >= parallel_chunks(tasks); }

void store_block(const float* block, int64_t t, int64_t rows, int64_t p, int64_t r0, at::Tensor& y,
                 const at::Tensor* bias) {
  store_block_any(block, t, rows, p, r0, y, bias);
}

void store_block(const double* block, int64_t t, int64_t rows, int64_t p, int64_t r0, at::Tensor& y,
                 const at::Tensor* bias) {
  store_block_any(block, t, rows, p, r0, y, bias);
}

}  // namespace sparsekernels::cpu
