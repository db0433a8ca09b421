// sparse24_mm on the CPU: y[..., N] = x[..., K] W^T for a 2:4 weight W [N, K] stored as
// values [N, K/2] + meta [N, K/4] (uint8: positions i0 | i1 << 2 of the two kept weights
// of each group of 4 along a row).
//
// Batch panels as the CSR kernels' (csr_common.h; 64 wide for batches over 16 rows, 32
// without AVX-512: the batch-only choose_panel(m)), but the 2:4 structure lets a task
// run several output rows in lockstep over the groups (simd_rows.inc's rows24), and
// every row of a task reads the same groups: a task (panel, 32 rows; 64 when the panel
// exceeds the L2) sweeps K in slices of the panel (sparse24_slice_bytes: L1-sized on
// Intel and with AVX2, a quarter of the L2 on the AVX-512 AMD), so a slice comes from the
// next cache level once per task and is then served to all the task's rows (each panel
// row is read by half of them), instead of each row gathering its rows from L2 as the CSR
// kernel must. The rows' partial sums stay in the task's L1 buffer between slices. With
// AVX2 a task sweeps a group of panels with the same rows (Plan24: the streamed plan).
// Every output element sums its terms in group order, whatever the plan, the slices or
// the threads.
// No column indices are read at all: meta is one byte per 4 weights.
// Decode-sized batches skip the panels (sparse24_few_rows, kFewRows rows); bf16 batches of
// kAmxMinRows to kAmxRows rows run on AMX tiles where the CPU has them (sparse24_amx.cpp).
#include "csr_common.h"
#include "simd_rows.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <type_traits>

namespace sparsekernels::cpu {
namespace {

// Bytes of the packed panel one K slice covers, which the two machine kinds want far
// apart. Intel: small enough to stay in L1 next to the task's output buffer (32 rows x T
// floats); Sapphire Rapids, one core, 4096 x 4096 weight, T = 64: 16 KiB slices 1.33 ns
// per non-zero, 32 KiB 1.34, 64 KiB 1.81, no slicing 1.68. AMD: a quarter of the L2, so
// the slice stays in L2 while the task's weights stream past it, and the core's L2 -> L1
// path serves the rows; EPYC (1 MiB L2), 2 threads, ms at (256, 4096 -> 4096) /
// (256, 11008 -> 4096), interleaved: 16 KiB 49.3 / 137.6, 64 KiB 32.7 / 79.8, 128 KiB
// 30.5 / 78.7, 256 KiB 29.6 / 73.4, 512 KiB 30.7 / 74.4, no slicing 34.5 / 91.0.
constexpr int64_t kL1SliceBytes = 16 * 1024;

constexpr int64_t kMaxRowsPerTask = 64;  // rows per task: 32, or this for panels over the L2

// Rows [r0, r1) over groups [g0, g1) into block [r1 - r0, T]: the block is overwritten
// when g0 == 0 and accumulated into otherwise.
template <typename acc_t, int64_t T>
void rows24_generic(const acc_t* panel_x, acc_t* block, const acc_t* vals, const uint8_t* meta, int64_t groups,
                    int64_t g0, int64_t g1, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    acc_t acc[T];
    for (int64_t j = 0; j < T; ++j) acc[j] = g0 == 0 ? acc_t(0) : block[(r - r0) * T + j];
    const acc_t* v = vals + r * 2 * groups;
    const uint8_t* m = meta + r * groups;
    for (int64_t g = g0; g < g1; ++g) {
      const acc_t* x0 = panel_x + (4 * g + (m[g] & 3)) * T;
      const acc_t* x1 = panel_x + (4 * g + (m[g] >> 2)) * T;
      const acc_t w0 = v[2 * g], w1 = v[2 * g + 1];
      for (int64_t j = 0; j < T; ++j) acc[j] += w0 * x0[j] + w1 * x1[j];
    }
    for (int64_t j = 0; j < T; ++j) block[(r - r0) * T + j] = acc[j];
  }
}


// How sparse24_panels runs its tasks. Sliced (AVX-512, and the portable loops): a task is
// (panel, rows), tasks in panel order, so the panel is read by a run of tasks while their
// rows' values stream from memory. Streamed (AVX2: measured on Zen 3): a task is (a group
// of panels, rows) and sweeps its panels one after another, so its rows' values and meta
// (32 rows: 288 KiB at K = 4096) stay in L2 for all of them, the group's panels
// (kStreamGroupBytes) stay in L3 for all the tasks, the slices are L1-sized, and rows24
// prefetches the next rows' values and meta (`prefetch`). One thread, ms (dense GEMM in
// the same minutes): sliced / streamed at (256, 4096 -> 4096) 150.8 / 121.6 (166); at 2
// threads (256, 4096 -> 4096) 76.0 / 63.3 (99.3), (2048, 1024 -> 1024) 36.9 / 36.1
// (42.5), (256, 11008 -> 4096) 246.6 / 192.3 (284.6). Without the prefetch, 16 KiB slices
// lose to 128 KiB (1.3 against 1.7 G FMAs per second in a stand-alone copy; 2.1-2.3 G
// with it).
struct Plan24 {
  bool prefetch;          // rows24 prefetches the next rows' values and meta
  int64_t slice_bytes;    // bytes of the packed panel a K slice covers
  int64_t rows_per_task;  // output rows per task
  int64_t group_panels;   // panels a task sweeps, one after another
};

// The group of panels a streamed task sweeps: at most this many bytes of packed x, or one
// panel. Zen 3 (32 MiB L3), one thread, ms at (256, 4096 -> 4096) / (2048, 1024 -> 1024) /
// (2048, 3072 -> 768): 1 MiB 146 / 65 / 176, 2 MiB 130 / 62 / 152, 4 MiB 122 / 66 / 150,
// 8 MiB - / 79 / 167, 32 MiB - / 80 / 182; one panel per task (the sliced order) 194 at
// (256, 4096 -> 4096), as its rows' values then come from memory once per panel.
constexpr int64_t kStreamGroupBytes = 4 * 1024 * 1024;

// Panels per group when p_count panels are cut into groups of at most `most`: as many
// groups as `most` needs, of equal size (the last may be short by less than one panel
// per group). Tasks are numbered group-major and the threads take contiguous runs of
// them, so a short last group left a thread idle: (2048, 768 -> 3072) has 64 panels of
// 96 KiB, groups of at most 42, and cut greedily into 42 + 22 one of two threads did
// two thirds of the work.
int64_t balanced_group(int64_t p_count, int64_t most) {
  const int64_t count = (p_count + most - 1) / most;
  return (p_count + count - 1) / count;
}

Plan24 plan24(int64_t k, int64_t t, int64_t p_count, int64_t elem_bytes, bool fp32) {
  const int64_t slice_bytes = sparse24_slice_bytes();
  if (fp32 && sparse24_streams()) {
    const int64_t panel_bytes = std::max<int64_t>(1, k * t * elem_bytes);
    const int64_t most = std::clamp<int64_t>(kStreamGroupBytes / panel_bytes, 1, p_count);
    return {true, slice_bytes, 32, balanced_group(p_count, most)};
  }
  // Rows per task. Every task sweeps the whole panel; one larger
  // than the L2 then comes from L3 once per task, so such panels get tasks of twice the
  // rows: K = 11008 (2.8 MB), one Sapphire Rapids core, 144-151 ms instead of 155-160.
  // Not more: 128 rows of accumulators (32 KiB) and a slice no longer fit L1 (192 ms).
  return {false, slice_bytes, panel_fits_l2(k, t, elem_bytes) ? 32 : kMaxRowsPerTask, 1};
}

// x2 [M, K]'s panels are packed once for all chunks of tasks, or, where a task reads one
// panel, each chunk packs the panels its tasks read itself (chunks_pack_own_panels).
// Measured (Sapphire Rapids, 2 threads, builds alternating, first call after a dense one,
// x dense): (2048, 1024, 1024) 0.99-1.03 -> 1.09-1.12, (256, 4096, 4096) 1.13-1.16 -> 1.17.
template <typename acc_t, int64_t T>
void sparse24_panels(const at::Tensor& x2, at::Tensor& y, const at::Tensor& vals, const at::Tensor& meta,
                     const at::Tensor* bias) {
  const int64_t k = x2.size(1), n = y.size(1), groups = k / 4;
  const int64_t p_count = (x2.size(0) + T - 1) / T;
  const Plan24 plan = plan24(k, T, p_count, sizeof(acc_t), std::is_same_v<acc_t, float>);
  const int64_t rows_per_task = plan.rows_per_task;
  const int64_t blocks = (n + rows_per_task - 1) / rows_per_task;
  const int64_t tasks = (p_count + plan.group_panels - 1) / plan.group_panels * blocks;
  const at::Tensor px = plan.group_panels == 1 && chunks_pack_own_panels(p_count, tasks)
                            ? at::Tensor()
                            : pack_panels(x2, T, c10::CppTypeToScalarType<acc_t>::value, /*slot=*/0);
  // A group is 4 panel rows of T values.
  const int64_t group_bytes = 4 * T * static_cast<int64_t>(sizeof(acc_t));
  const int64_t slice_groups = std::max<int64_t>(1, plan.slice_bytes / group_bytes);
  const acc_t* v = vals.data_ptr<acc_t>();
  const uint8_t* m = meta.data_ptr<uint8_t>();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    ChunkPanels<acc_t, T> panels(x2, px);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p0 = task / blocks * plan.group_panels, r0 = (task % blocks) * rows_per_task;
      const int64_t r1 = std::min(n, r0 + rows_per_task);
      for (int64_t p = p0; p < std::min(p_count, p0 + plan.group_panels); ++p) {
        const acc_t* x = panels.panel(p);
        alignas(64) acc_t block[kMaxRowsPerTask * T];
        for (int64_t g0 = 0; g0 < groups; g0 += slice_groups) {
          const int64_t g1 = std::min(groups, g0 + slice_groups);
          bool done = false;
          if constexpr (std::is_same_v<acc_t, float>) {
            done = with_simd_rows([&](auto rows) {
              decltype(rows)::template rows24<T>(x, block, v, m, groups, g0, g1, r0, r1, plan.prefetch);
            });
          }
          if (!done) rows24_generic<acc_t, T>(x, block, v, m, groups, g0, g1, r0, r1);
        }
        store_block(block, T, r1 - r0, p, r0, y, bias);
      }
    }
  });
}

// x2 [M <= kFewRows, K] (fp32 compute, a CPU with SIMD kernels) into y, for fp32 or bf16
// values [N, K / 2] (contiguous): rows24_few over tasks of 32 output rows. bf16 x and
// values on a CPU with AVX512-BF16 (bf16_step) take its bf16 dot step, x as it is;
// otherwise x is read as fp32 (few_rows_operand). Each task checks its rows' meta bytes
// just before reading them: at M = 1 a separate pass over meta took a quarter of the
// product's time (4096 x 4096). False when some task's meta was invalid (that task was
// skipped).
bool sparse24_few_rows(const at::Tensor& x2, at::Tensor& y, const at::Tensor& vals, const at::Tensor& meta,
                       const at::Tensor* bias) {
  constexpr int64_t kRows = 32;
  const int64_t m = x2.size(0), k = x2.size(1), groups = k / 4, n = y.size(1);
  const bool dot = x2.scalar_type() == at::kBFloat16 && vals.scalar_type() == at::kBFloat16 &&
                   bf16_step() >= Bf16Step::kDot;
  at::Tensor holder;
  const float* x = nullptr;
  const c10::BFloat16* xb = nullptr;
  if (!dot) {
    x = few_rows_operand(x2, /*transposed=*/false, holder);
  } else if (x2.is_contiguous()) {
    xb = x2.data_ptr<c10::BFloat16>();
  } else {
    holder = workspace(0, {m, k}, at::kBFloat16);
    holder.copy_(x2);
    xb = holder.data_ptr<c10::BFloat16>();
  }
  const uint8_t* mt = meta.data_ptr<uint8_t>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, (n + kRows - 1) / kRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r0 = task * kRows, r1 = std::min(n, r0 + kRows);
      if (!meta24_valid(mt + r0 * groups, (r1 - r0) * groups)) {
        ok = false;
        continue;
      }
      alignas(64) float block[kRows * kFewRows];
      with_few_rows(m, [&](auto few) {
        constexpr int M = decltype(few)::value;
#if defined(SPARSEKERNELS_X86_SIMD)
        if (dot) {
          RowsAvx512Bf16::rows24_few<M>(xb, block, vals.data_ptr<c10::BFloat16>(), mt, groups, r0, r1);
          return;
        }
#endif
        with_simd_rows([&](auto rows) {
          with_value_data(vals, [&](auto* v) {
            decltype(rows)::template rows24_few<M>(x, block, v, mt, groups, r0, r1);
          });
        });
      });
      store_block(block, m, r1 - r0, 0, r0, y, bias);
    }
  });
  return ok.load();
}

}  // namespace

// Whether every meta byte of p[0, count) holds two positions in [0, 4) with i0 < i1: a
// corrupt byte is an error, not an out-of-group read. Branch-free so the compiler
// vectorises it: the short-circuit form took 5 ms of a 50 ms forward at 4096 x 4096
// (one core). In bytes throughout, so it vectorises 16 bytes to a vector: with unsigned
// ints the compiler widened every byte to 32 bits, and at M = 1 the check took 40% of a
// 4096 x 4096 product.
bool meta24_valid(const uint8_t* p, int64_t count) {
  uint8_t bad = 0;
  for (int64_t i = 0; i < count; ++i) {
    const uint8_t b = p[i];
    const uint8_t i0 = b & 3, i1 = (b >> 2) & 3;
    bad |= static_cast<uint8_t>((b >> 4) | (i0 >= i1 ? 1 : 0));
  }
  return bad == 0;
}

[[noreturn]] void meta24_invalid(const char* what) {
  TORCH_CHECK_VALUE(false, what, ": meta entries must be i0 | i1 << 2 with 0 <= i0 < i1 < 4");
}

void check_meta24(const char* what, const at::Tensor& meta) {
  const uint8_t* mp = meta.data_ptr<uint8_t>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, meta.numel(), 1 << 18, [&](int64_t begin, int64_t end) {
    if (!meta24_valid(mp + begin, end - begin)) ok = false;
  });
  if (!ok.load()) meta24_invalid(what);
}

bool sparse24_streams() { return simd_level() == SimdLevel::kAvx2; }

int64_t sparse24_slice_bytes() {
  // Capped so a VM reporting an inflated L2 does not turn the slicing off (measured up to
  // 512 KiB slices on the 1 MiB-L2 EPYC: 30.7 ms against 29.6 at 256 KiB).
  if (sparse24_streams() || !cpu_is_amd()) return kL1SliceBytes;
  return std::clamp<int64_t>(l2_cache_bytes() / 4, kL1SliceBytes, 512 * 1024);
}

// bias (optional [N], x's dtype) is added to every output row as y is written.
at::Tensor sparse24_mm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                           const std::optional<at::Tensor>& bias) {
  check_sparse24("sparse24_mm", values, meta);
  const int64_t n = values.size(0), k = 4 * meta.size(1);
  TORCH_CHECK_VALUE(x.dim() >= 1, "sparse24_mm: x must have at least 1 dimension");
  check_dense("sparse24_mm", "x", x, values.scalar_type(), k);
  const at::Tensor b = checked_bias("sparse24_mm", bias, values.scalar_type(), n);
  const at::Tensor* bp = b.defined() ? &b : nullptr;
  const at::Tensor mc = meta.contiguous();
  // The whole meta tensor checked in one pass, split over the threads (the few-rows path
  // checks each task's bytes instead, just before it reads them).
  auto check_meta = [&] { check_meta24("sparse24_mm", mc); };

  const int64_t m = leading_rows(x);
  const at::Tensor x2 = x.reshape({m, k});
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  if (m == 0 || n == 0 || k == 0) check_meta();
  if (m == 0 || n == 0) return at::empty(out_shape, x.options());
  if (k == 0) return bp ? at::zeros(out_shape, x.options()).add_(*bp) : at::zeros(out_shape, x.options());
  const at::ScalarType ct = compute_type(x.scalar_type());
  const int64_t t = choose_panel(m);
  // Allocated in the output's shape and returned as is (not a view: callers may add to it
  // in place); the kernels write it as [M, N].
  at::Tensor out = at::empty(out_shape, x.options());
  at::Tensor y = out.view({m, n});
  if (m >= kAmxMinRows && m <= kAmxRows && k % kAmxChunk == 0 && x.scalar_type() == at::kBFloat16 &&
      bf16_step() == Bf16Step::kAmx) {
    if (!sparse24_amx(x2, y, values.contiguous(), mc, bp)) meta24_invalid("sparse24_mm");
    return out;
  }
  const bool dot = x.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16 &&
                   bf16_step() >= Bf16Step::kDot;
  if (runs_few_rows(ct, m, dot ? kDotMinRows - 1 : kFewRows)) {
    if (!sparse24_few_rows(x2, y, few_rows_values(values), mc, bp)) meta24_invalid("sparse24_mm");
    return out;
  }
  check_meta();
  if (dot) {
    sparse24_dot(x2, y, values, mc, bp);
    return out;
  }
  const at::Tensor v = values_in(values, ct);
  with_panel_width(t, [&](auto width) {
    constexpr int64_t T = decltype(width)::value;
    if (ct == at::kDouble) sparse24_panels<double, T>(x2, y, v, mc, bp);
    else sparse24_panels<float, T>(x2, y, v, mc, bp);
  });
  return out;
}

// The row loop of the fp32 panels alone (rows24 at the panel width of a large batch), for
// the benchmark's ceiling of the 2:4 forward (sparsekernels/bench/roofline.py): each
// thread sweeps 32 rows over one L1-sized slice `reps` times, its x slice (16 KiB), values
// and meta read again every sweep, so they stay in the caches nearest the core. No x
// packing, no streaming of values, no writes to y: no plan of this loop runs faster.
// Returns the useful GFLOP/s of all threads together (2 FLOPs per kept weight per batch
// column).
double sparse24_loop_gflops(int64_t reps) {
  TORCH_CHECK_VALUE(reps >= 1, "cpu_sparse24_loop_gflops: reps must be >= 1, got ", reps);
  constexpr int64_t kRows = 32;
  const int64_t threads = at::get_num_threads();
  double seconds = 0.0, flops = 0.0;
  with_panel_width(choose_panel(kWidePanel), [&](auto width) {
    constexpr int64_t T = decltype(width)::value;
    constexpr int64_t kGroups = kL1SliceBytes / (4 * T * static_cast<int64_t>(sizeof(float)));
    std::atomic<uint32_t> sink{0};
    const auto start = std::chrono::steady_clock::now();
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        alignas(64) float x[4 * kGroups * T];
        alignas(64) float vals[kRows * 2 * kGroups];
        alignas(64) float block[kRows * T];
        uint8_t meta[kRows * kGroups];
        constexpr uint8_t kCodes[6] = {0 | 1 << 2, 0 | 2 << 2, 0 | 3 << 2, 1 | 2 << 2, 1 | 3 << 2, 2 | 3 << 2};
        for (int64_t j = 0; j < 4 * kGroups * T; ++j) x[j] = static_cast<float>(j % 7) * 0.125f;
        for (int64_t j = 0; j < kRows * 2 * kGroups; ++j) vals[j] = static_cast<float>(j % 5) * 0.25f;
        // Positions vary from row to row and group to group, as a pruned weight's do.
        for (int64_t j = 0; j < kRows * kGroups; ++j) meta[j] = kCodes[(j * 7 + j / kGroups) % 6];
        for (int64_t rep = 0; rep < reps; ++rep) {
          const bool simd = with_simd_rows([&](auto rows) {
            decltype(rows)::template rows24<T>(x, block, vals, meta, kGroups, 0, kGroups, 0, kRows);
          });
          if (!simd) rows24_generic<float, T>(x, block, vals, meta, kGroups, 0, kGroups, 0, kRows);
        }
        uint32_t bits;
        std::memcpy(&bits, &block[(kRows - 1) * T], sizeof(bits));
        sink.fetch_add(bits, std::memory_order_relaxed);  // the results are used
      }
    });
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    flops = 2.0 * static_cast<double>(threads) * static_cast<double>(reps) * kRows * 2 * kGroups * T;
    (void)sink.load();
  });
  return flops / std::max(seconds, 1e-9) / 1e9;
}

TORCH_LIBRARY_IMPL(sparsekernels_C, CPU, m) { m.impl("sparse24_mm", &sparse24_mm_cpu); }

}  // namespace sparsekernels::cpu
