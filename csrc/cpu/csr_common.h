// Shared pieces of the CPU CSR kernels: input checks, batch-panel packing, ISA detection.
//
// Layout used by every CPU CSR kernel: the dense operand X [M, K] is repacked into
// "batch panels" [P, K, T] (P = ceil(M / T)), i.e. X^T cut into T-wide column strips.
// For one non-zero w[r, k] the kernel then does y^T[r, 0:T] += w * panel[k, 0:T]: a
// contiguous T-float axpy whose accumulator stays in registers for the whole row.
// T is chosen per CPU (choose_panel): on Intel T = 64 floats = four 512-bit registers (a
// [4096, 64] fp32 panel is 1 MiB, half of a Sapphire Rapids core's L2), on AMD 32 (the
// EPYC's L2 is 1 MiB), so a panel stays cache-resident while every output row gathers
// from it. Outputs are written by store_block, task by task.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <utility>

namespace sparsekernels::cpu {

// Panel widths. Narrow panels serve small batches (B <= 16 would waste 75% or more of
// a 64-wide panel on padding).
constexpr int64_t kWidePanel = 64;
constexpr int64_t kMidPanel = 32;
constexpr int64_t kNarrowPanel = 16;

// Batches of at most kFewRows rows (decode-sized inputs) skip the panels in the 2:4
// kernel, kFewRowsCsr rows in the CSR products: a 16-wide panel leaves 16 - M lanes of
// every gathered row empty, and its kernel's cost hardly falls with M. The 2:4 product
// then runs simd_rows.inc's rows24_few (a row's kept values against x's, picked by
// permutes), spmm / spmm_t spmm_few (x^T [K, M] rows in the first lanes, the panel
// kernel's bits). The bounds are measured (Sapphire Rapids, 2 threads, us, panels ->
// few rows): 2:4 4096 x 4096, M = 1: 3500 -> 1000, 4: 3500 -> 1850, 8: 3450 -> 2900
// (16-row panels: 2900-3100); CSR at 90%, 4096 x 4096, M = 1: 760-890 -> 670-720, 2:
// 830-940 -> 760-810, 4: 840-950 -> 820-880, 8: 830-950 -> 900-1050. rows24_few walking
// x in L1-sized slices then took the 2:4 product at M = 4 from 1500 to 1260-1330 us and
// at M = 8 from 2400 to 2010-2080 (fp32; bf16 2300 -> 1880-1910).
constexpr int64_t kFewRows = 8;
constexpr int64_t kFewRowsCsr = 2;
// The 2:4 weight gradient (sparse24_sddmm) runs without panels up to this many rows: a
// permute per batch row and vector of kept entries stays cheaper than a 16-wide panel's
// dot products there (4096 x 4096, 16 rows: 10.4 against 10.9-11.9 ms).
constexpr int64_t kFewRowsBackward = 16;

// Calls f(std::integral_constant<int, M>{}) for m = M in [1, kMax] (kFewRows unless
// given: the 2:4 backward's few-rows kernels take up to kFewRowsBackward).
template <int kMax = kFewRows, int M = 1, typename F>
void with_few_rows(int64_t m, F&& f) {
  if constexpr (M > kMax) {
    TORCH_INTERNAL_ASSERT(false, "with_few_rows: m = ", m, " is over ", kMax);
  } else if (m == M) {
    f(std::integral_constant<int, M>{});
  } else {
    with_few_rows<kMax, M + 1>(m, std::forward<F>(f));
  }
}

// A weight's values in the compute dtype ct, contiguous: `vals` itself where they
// already are, else a copy in workspace slot 2 (a fresh tensor per call paid its page
// faults: bf16 2:4 values of a 4096 x 4096 weight widened into one took 13.9 ms of a
// one-row product whose kernel takes ~1 ms).
at::Tensor values_in(const at::Tensor& vals, at::ScalarType ct);

// x [M, K] (any floating dtype, any strides) as a contiguous fp32 matrix, [M, K] or, with
// `transposed`, x^T [K, M]: x's own data where it already is one, else a copy in
// workspace slot `slot` (held by `holder`).
const float* few_rows_operand(const at::Tensor& x, bool transposed, at::Tensor& holder, int slot = 0);

// The batch-only rule of the 2:4 kernel: its K slices (sparse24_slice_bytes) keep the
// panel's reads in cache whatever the width. 64 wide, or 32 without AVX-512 (widest_panel);
// 16 for batches of up to 16 rows, 32 for up to 32 (as the CSR rule below).
int64_t choose_panel(int64_t m);

// The widest panel the CPU's row kernels keep in registers: 64 with AVX-512, else 32
// (with AVX2's 16 registers a 64-wide row's accumulators alone take 8, which leaves no
// room for a second FMA chain, the fused backward's x row or the 2:4 kernel's lockstep).
int64_t widest_panel();

// Per-core L2 size in bytes (sysconf; 1 MiB when unknown).
int64_t l2_cache_bytes();

// Whether a panel of `rows` rows of t values of elem_bytes fits in max(3/4 of L2, 1 MiB).
bool panel_fits_l2(int64_t rows, int64_t t, int64_t elem_bytes);

// Panel width for a CSR kernel that gathers rows of a panel with `gathered_rows` rows of
// `elem_bytes` values: the widest of 64 / 32 / 16 whose panel fits in
// max(3/4 of L2, 1 MiB), so the gathers stay in L2. Measured on a 2 MiB-L2 Sapphire
// Rapids core (90% sparse, ns per gather per 64 batch columns, best of 3, 64 / 32 / 16
// wide): K = 4096: 2.25 / 2.55 / 2.74; 8192: 3.16 / 2.64 / 3.06; 11008: 4.64 / 2.83 /
// 3.18; 16384: 7.78 / 3.61 / 3.32. The 1 MiB floor keeps 64 wide at K = 4096 on CPUs
// with a smaller L2, as they were tuned.
// On AMD (cpu_is_amd) 32 wide instead, or 16 where a 32-wide panel exceeds twice the L2:
// there 32 beat 64 at every benchmarked forward and at two of three layer steps (EPYC,
// 1 MiB L2, 2 threads, interleaved, ms 64 / 32 / 16 wide): forward (256, 4096 -> 4096)
// 90% 10.4 / 9.5 / 10.2, 95% 5.6 / 4.9 / 4.8; (256, 11008 -> 4096) 90% 44.6 / 34.2 /
// 38.3; (2048, 1024 -> 1024) 90% 5.9 / 4.9 / 5.0; (2048, 768 -> 3072) 98% 4.1 / 3.5 /
// 3.4; layer step (256, 4096 -> 4096) 90% 32.0 / 29.2 / 31.9, (256, 11008 -> 4096)
// 128.7 / 111.8 / 110.0, (2048, 768 -> 3072) 98% 13.9 / 14.3 / 14.8.
// Batches of 17-32 rows get at most 32: a 64-wide panel half empty costs what a full one
// does (Sapphire Rapids, 2 threads, us, 64 -> 32 wide: 90% CSR at 4096 x 4096, B = 24
// 2320-2640 -> 1400-1750, B = 32 2330-2540 -> 1320; 2:4 B = 24 7430-8300 -> 4540-4640,
// B = 32 7450-8090 -> 4380-4590; 1024 x 1024 alike).
int64_t choose_panel(int64_t m, int64_t gathered_rows, int64_t elem_bytes);

// Makes choose_panel(m, gathered_rows, elem_bytes) return `t` (16, 32 or 64) for batches
// over 16 rows on any CPU, or its rule again for 0: tests run the CSR products (spmm,
// spmm_t, sddmm, spmm_backward) at every width on every machine kind. The 2:4 kernel's
// batch-only rule ignores it.
void force_panel_width(int64_t t);

// Bytes of the packed panel one K slice of the 2:4 kernel covers (sparse24_mm.cpp): 16 KiB
// on Intel and where the fp32 kernels run AVX2, a quarter of the L2 on the AVX-512 AMD (at
// most 512 KiB).
int64_t sparse24_slice_bytes();

// The useful GFLOP/s of the 2:4 forward's row loop with its data in L1, all threads
// (sparse24_mm.cpp; the benchmark's ceiling for the 2:4 forward).
double sparse24_loop_gflops(int64_t reps);

// Whether the 2:4 kernel's fp32 panels run its streamed plan (sparse24_mm.cpp: Plan24):
// where the fp32 kernels run AVX2.
bool sparse24_streams();

// Calls f(std::integral_constant<int64_t, T>{}) for the panel width t (64, 32 or 16), so
// a kernel templated on T is instantiated once per width in one place.
template <typename F>
void with_panel_width(int64_t t, F&& f) {
  if (t == kWidePanel) f(std::integral_constant<int64_t, kWidePanel>{});
  else if (t == kMidPanel) f(std::integral_constant<int64_t, kMidPanel>{});
  else f(std::integral_constant<int64_t, kNarrowPanel>{});
}

// True when the running CPU is an AMD one (cpuid vendor, checked once). The kernels are
// tuned on two machine kinds, an AMD EPYC (32 KiB L1D, 1 MiB L2) and an Intel Sapphire
// Rapids (48 KiB L1D, 2 MiB L2); where the two want different blocking, a kernel asks this.
bool cpu_is_amd();

// True when the running CPU has AVX-512F (checked once, at run time, so the same
// binary runs on machines without it through the AVX2 or portable paths).
bool cpu_has_avx512();

// The instruction set the fp32 kernels run (simd_rows.h): the best of AVX-512F, AVX2 +
// FMA and the portable loops that the CPU has, or a lower one forced for tests.
enum class SimdLevel : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
namespace detail {
// What simd_level() returns; -1 until it is first asked (set by init_simd_level).
extern std::atomic<int> active_simd_level;
SimdLevel init_simd_level();
}  // namespace detail
// Inline, one relaxed load: the packing and store loops ask it per 16 x 16 tile (as an
// out-of-line call through two function-local statics it took 1.5% of SparseProp's layer
// step on Sapphire Rapids, by perf).
inline SimdLevel simd_level() {
  const int level = detail::active_simd_level.load(std::memory_order_relaxed);
  return level >= 0 ? static_cast<SimdLevel>(level) : detail::init_simd_level();
}
// The best level the CPU has, whatever is forced.
SimdLevel cpu_simd_level();
// Caps simd_level() at `level` (any level up to the CPU's), or restores the CPU's best
// for std::nullopt: tests run the AVX2 and portable kernels on AVX-512 machines too.
void force_simd_level(std::optional<SimdLevel> level);

// How the 2:4 product of a few bf16 rows (bf16 x and values) multiplies, best last:
//  kWiden: rows24_few widens x and the values to fp32 (any SIMD level);
//  kDot:   rows24_few's bf16 dot step (RowsAvx512Bf16: AVX512-BF16 and AVX512BW);
//  kAmx:   sparse24_amx (AMX-BF16 tiles) for kAmxMinRows to kAmxRows rows and K a
//          multiple of kAmxChunk; other batches as kDot.
// cpu_bf16_step(): the best the CPU (and, for AMX, the OS) allows at the AVX-512 level;
// bf16_step(): that, capped by force_bf16_step (tests run every step on one CPU), and
// kWiden below the AVX-512 level.
enum class Bf16Step : int { kWiden = 0, kDot = 1, kAmx = 2 };
Bf16Step cpu_bf16_step();
Bf16Step bf16_step();
void force_bf16_step(std::optional<Bf16Step> step);
// True when the CPU has AMX-BF16 (with AVX512BW, AVX512-VBMI2 and BMI2, which the
// kernel's decompression uses) and the OS granted this process the tile data.
bool cpu_has_amx_bf16();

// sparse24_amx (sparse24_amx.cpp): y [M, N] = x2 [M, K] W^T for bf16 x2 and values [N,
// K / 2] (contiguous), M <= kAmxRows, K a multiple of kAmxChunk, on a CPU where
// cpu_has_amx_bf16(); the bias as store_block adds it. The meta bytes are checked as they
// are decoded (no read outside a group's values whatever they hold); false when some
// were invalid.
// From kAmxMinRows rows on: below, the weight's stream through the dot step is cheaper
// than its decompression (4096 x 4096, 2 threads, us, dot -> AMX: M = 1 600 -> 800, 2
// 790 -> 815, 3 950 -> 820, 4 1150 -> 820, 8 1850 -> 830; 16 rows: 1000, the panels
// 4000; oneDNN's dense bf16 GEMM 1160-1300 throughout). Up to kAmxRows = 32 rows: two
// 16-row blocks of x share each decompressed tile (17-32 rows 1.2-1.4 ms, the panels
// 6.2-7.0, oneDNN 1.5-1.6, measured in a slower hour).
constexpr int64_t kAmxMinRows = 3;
constexpr int64_t kAmxRows = 32;
constexpr int64_t kAmxChunk = 32;
bool sparse24_amx(const at::Tensor& x2, at::Tensor& y, const at::Tensor& vals, const at::Tensor& meta,
                  const at::Tensor* bias);

// dst[c * ds + r] = src[r * ss + c] (+ add[r] when given) for a 16 x 16 tile of 32-bit
// words, in registers; transpose16x16 needs AVX-512, transpose16x16_avx2 AVX2 (the caller
// checks simd_level()). Without add the words move as they are (no arithmetic: -0 stays
// -0, and any 32-bit data can go through).
void transpose16x16(const float* src, int64_t ss, float* dst, int64_t ds, const float* add = nullptr);
void transpose16x16_avx2(const float* src, int64_t ss, float* dst, int64_t ds, const float* add = nullptr);

// sparse24_dot (sparse24_dot.cpp): y [M, N] = x2 [M, K] W^T for bf16 x2 and bf16 values
// [N, K / 2] on AVX512-BF16 dot products, for batches of kDotMinRows rows or more on a CPU
// where bf16_step() >= kDot (those past kAmxRows where it has AMX). meta (contiguous) must
// have been checked; the bias as store_block adds it. y: bf16, contiguous.
// From 7 rows on it beats the few-rows kernels (4096 -> 4096, 2 threads, ms, few-rows /
// dot, best of 8 interleaved rounds: 5 rows 0.81 / 1.02, 6 0.98 / 1.05, 7 1.22 / 1.08,
// 8 1.46 / 1.29).
constexpr int64_t kDotMinRows = 7;
void sparse24_dot(const at::Tensor& x2, at::Tensor& y, const at::Tensor& vals, const at::Tensor& meta,
                  const at::Tensor* bias);

// sparse24_dot_sddmm (sparse24_dot_sddmm.cpp): dvalues [N, K / 2] (bf16, contiguous) =
// (dy2^T x2) at W's kept positions for bf16 dy2 [M, N] and x2 [M, K], on AVX512-BF16 dot
// products over pairs of batch rows, for batches of kDotSddmmMinRows rows or more on a
// CPU where bf16_step() >= kDot. meta (contiguous) must have been checked. From 4 rows
// on it beats the few-rows kernels of fp32 sums at 1024 -> 1024 (2 threads, us, those /
// dot: 1 row 71 / 93, 3 rows 92 / 98, 4 rows 102 / 99, 7 rows 140 / 113); at 4096 -> 4096
// it does from one row (ms: 1 row 2.3 / 1.9, 4 rows 3.3 / 2.0, 7 rows 12.5 / 2.2).
constexpr int64_t kDotSddmmMinRows = 4;
void sparse24_dot_sddmm(const at::Tensor& dy2, const at::Tensor& x2, at::Tensor& dvalues, const at::Tensor& meta);

// Whether a product of m rows computed in ct runs the few-rows kernels: at most `bound`
// rows (kFewRows, kFewRowsCsr), fp32 compute, a CPU with SIMD kernels.
inline bool runs_few_rows(at::ScalarType ct, int64_t m, int64_t bound) {
  return ct == at::kFloat && m <= bound && simd_level() != SimdLevel::kGeneric;
}

// A weight's values as the few-rows kernels read them: bf16 values as they are (the
// kernels widen them as they stream them: half the bytes), others values_in(vals, fp32).
at::Tensor few_rows_values(const at::Tensor& vals);

// Calls f with the data of v, fp32 or bf16 values (const float* or const c10::BFloat16*).
template <typename F>
void with_value_data(const at::Tensor& v, F&& f) {
  if (v.scalar_type() == at::kBFloat16) f(static_cast<const c10::BFloat16*>(v.data_ptr<c10::BFloat16>()));
  else f(static_cast<const float*>(v.data_ptr<float>()));
}

// Scalar type the kernels compute in: double for double, float for everything else
// (bf16 / fp16 inputs are widened while packing, so they accumulate in fp32).
inline at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Product of all but the last dimension (the rows of x viewed as a matrix).
inline int64_t leading_rows(const at::Tensor& x) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return m;
}

// Validates a CSR matrix with n_rows rows whose column indices must lie in
// [0, n_cols): int32 indices, 1-D tensors on the CPU, row_ptr of n_rows + 1
// monotone entries from 0 to nnz. `what` names the op in error messages.
// check_columns == false leaves the column range to the caller, whose kernel checks each
// task's indices (indices_in_range) just before reading them and then raises
// columns_out_of_range: a separate pass over the indices cost ~10% of a 90%-sparse
// (256, 4096, 4096) forward on one Sapphire Rapids core (22.1 vs 20.0 ms), more than the
// pass's own reads. Such a caller must call check_csr_columns on paths where no task runs.
void check_csr(const char* what, const at::Tensor& values, const at::Tensor& row_ptr,
               const at::Tensor& col_idx, int64_t n_rows, int64_t n_cols, bool check_columns = true);
void check_csr_columns(const char* what, const at::Tensor& col_idx, int64_t n_cols);
// Validates a 2:4 weight's tensors (floating values [N, K/2], uint8 meta [N, K/4], both on
// the CPU); the meta bytes themselves are checked by the kernels as they read them.
void check_sparse24(const char* what, const at::Tensor& values, const at::Tensor& meta);
// Whether every meta byte of p[0, count) holds two positions i0 < i1 in [0, 4) (and
// nothing in bits 4-7); check_meta24 checks a whole contiguous meta tensor that way, split
// over the threads, and raises meta24_invalid's ValueError (`what` names the op).
bool meta24_valid(const uint8_t* p, int64_t count);
[[noreturn]] void meta24_invalid(const char* what);
void check_meta24(const char* what, const at::Tensor& meta);
[[noreturn]] void columns_out_of_range(const char* what, int64_t n_cols);

// True when every idx[0, count) lies in [0, bound) (one unsigned max over them: a
// negative index reads as >= 2^31).
bool indices_in_range(const int32_t* idx, int64_t count, int64_t bound);

// Checks a dense operand: floating dtype equal to `dtype`, CPU, at least 1-D with
// last dimension `k`.
void check_dense(const char* what, const char* arg, const at::Tensor& x, at::ScalarType dtype,
                 int64_t k);

// dy [..., N] and x [..., K] of a weight-gradient product must share their leading
// (batch) dimensions: a ValueError naming `what` otherwise.
void check_same_batch(const char* what, const at::Tensor& dy, const at::Tensor& x);

// A product's optional bias, checked (CPU, `dtype`, 1-D [n]; errors name "bias") and made
// contiguous for store_block; undefined when none was given.
at::Tensor checked_bias(const char* what, const std::optional<at::Tensor>& bias, at::ScalarType dtype, int64_t n);

// x: [M, K] any strides, any floating dtype -> panels [P, K, T] of `compute` dtype,
// rows M..P*T-1 zero. The result lives in workspace slot `slot`.
// col_sums (optional, [P, K] contiguous of `compute` dtype): filled with each panel's
// column sums of x (its rows in order), from the tiles as they are packed: a layer's bias
// gradient (dy summed over the batch) without another pass over dy.
at::Tensor pack_panels(const at::Tensor& x, int64_t panel, at::ScalarType compute, int slot,
                       at::Tensor* col_sums = nullptr);
// Panel p of pack_panels(x, t, ...) into panel [K, t] (out_t: the compute dtype) on the
// calling thread, with its column sums into col_sums [K] when given (bit for bit those of
// pack_panels). For a thread that packs the panels it reads itself. Only x's columns
// [c0, c1) (c1 < 0: to the end; c0 a multiple of 64 for pack_panels' sums) when given:
// panel rows c0 .. c1 - 1, at their places in panel.
template <typename out_t>
void pack_one_panel(const at::Tensor& x, int64_t t, int64_t p, out_t* panel, out_t* col_sums, int64_t c0 = 0,
                    int64_t c1 = -1);

// Whether the chunks of a parallel loop over tasks (panel, row block), run panel by panel,
// pack the panels their tasks read themselves (ChunkPanels) instead of reading panels
// packed for all of them beforehand: where there are at least as many panels as chunks,
// so a panel is packed twice at most where two chunks split it. Why: a shared packed
// panel reaches each chunk's L2 through its gathers' first touches, random, one miss to
// L3 per line, which the kernel waits for; packed by the chunk just before its first task,
// the panel is in L2 when the gathers start, and no packed copy is written out and read
// back. DEVELOPERS.md has the measurements.
bool chunks_pack_own_panels(int64_t p_count, int64_t tasks);

// How many chunks at::parallel_for(0, tasks, 1, ...) forms: one per thread, at most one
// per task (at least one).
int64_t parallel_chunks(int64_t tasks);

// The panels of x [M, K] a chunk of tasks reads, in the compute dtype acc_t: panel p of
// `packed` [P, K, T] where that is defined, else the chunk's own copy, packed (with its
// column sums into col_sums [K], when given) when the chunk moves to panel p.
template <typename acc_t, int64_t T>
class ChunkPanels {
 public:
  ChunkPanels(const at::Tensor& x, const at::Tensor& packed) : x_(x), k_(x.size(1)) {
    if (packed.defined()) shared_ = packed.data_ptr<acc_t>();
    else own_ = at::empty({k_ * T}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  }
  const acc_t* panel(int64_t p, acc_t* col_sums = nullptr) {
    if (shared_ != nullptr) return shared_ + p * k_ * T;
    if (p != own_p_) {
      pack_one_panel<acc_t>(x_, T, p, own_.data_ptr<acc_t>(), col_sums);
      own_p_ = p;
    }
    return own_.data_ptr<acc_t>();
  }

 private:
  const at::Tensor& x_;
  const int64_t k_;
  const acc_t* shared_ = nullptr;
  at::Tensor own_;
  int64_t own_p_ = -1;
};

// Writes one task's output straight into y [M, N] (row-major, floating, any dtype):
// block [rows, T] holds output rows r0 .. r0+rows-1 of panel p, and
// y[p*T + j][r0 + r] = block[r][j] for the batch rows p*T + j < M (padding dropped).
// 16 x 16 tiles are transposed in registers; each store is one 64-byte line of y. Why
// not a panel-shaped output and an unpack pass: that wrote and re-read M*N floats once
// more (a tenth of the kernel's time at 90% sparsity, a third at 98%).
// bias (optional, contiguous [N] of y's dtype): added to every row of y as it is stored,
// which saves a separate pass over y (read and write) for a layer's bias.
void store_block(const float* block, int64_t t, int64_t rows, int64_t p, int64_t r0, at::Tensor& y,
                 const at::Tensor* bias = nullptr);
void store_block(const double* block, int64_t t, int64_t rows, int64_t p, int64_t r0, at::Tensor& y,
                 const at::Tensor* bias = nullptr);

// The CSR ops with the dense operand dy [..., N] already packed (pack_panels of dy viewed
// as [M, N], compute_type(dy), slot 0, at a width the caller chose for both products: the
// ops take it from the packing), or nullptr to pack it themselves: spmm_t (dx = dy W) and sddmm (dvalues = (dy^T x) at W's pattern) of one
// backward share one packing of dy (spmm_backward.cpp). Both check their inputs.
at::Tensor spmm_t_packed(const at::Tensor& dy, const at::Tensor* pdy, const at::Tensor& values,
                         const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx, const at::Tensor& t_perm);
at::Tensor sddmm_packed(const at::Tensor& dy, const at::Tensor* pdy, const at::Tensor& x, const at::Tensor& row_ptr,
                        const at::Tensor& col_idx);

// The transpose map (t_row_ptr [n_rows + 1], t_col_idx, t_perm [nnz]) as spmm_t reads it:
// W^T's CSR by check_csr without the column pass (the kernels check each task's
// indices), t_perm 1-D int32 / int64 with one entry per value (its range: gather_values).
void check_transpose_map(const at::Tensor& values, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
                         const at::Tensor& t_perm, int64_t n_rows, int64_t n_cols);

// out[e] = vals[perm[e]] (W's values in W^T's order through the transpose map), in the
// compute dtype ct, in workspace slot 2. Raises ValueError when perm leaves [0, nnz).
at::Tensor gather_values(const at::Tensor& vals, const at::Tensor& perm, at::ScalarType ct);

// A per-thread scratch buffer of at least `numel` elements, reused across calls. Slot
// `slot` (0..kWorkspaceSlots-1) lets one op hold several at once. Why: the packed panels
// are megabytes, and a fresh allocation of that size costs its page faults on every call
// (0.5 ms per 8 MiB measured here, as much as the kernel at high sparsity).
constexpr int kWorkspaceSlots = 5;
at::Tensor workspace(int slot, at::IntArrayRef shape, at::ScalarType dtype);

// p moved up to the next 64-byte boundary (a cache line, an aligned zmm load): for
// scratch allocated with 64 bytes of slack.
template <typename T>
T* align64(T* p) {
  return p + (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64 / sizeof(T);
}
// Frees this thread's scratch buffers.
void release_workspace();

}  // namespace sparsekernels::cpu
