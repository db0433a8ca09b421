// Schemas of the compiled kernels. The public ops (torch.ops.sparsekernels.*, defined in
// sparsekernels/ops/) choose a backend and call these for the compiled ones; the
// device implementations register themselves next to their kernels
// (csrc/cpu/*.cpp, csrc/cuda/*.cu).
#include <Python.h>
#include <torch/library.h>

#include "cpu/csr_common.h"

#include <optional>
#include <string>

namespace sparsekernels {

bool cpu_has_avx512_op() { return cpu::simd_level() == cpu::SimdLevel::kAvx512; }
std::string cpu_simd_level_op() {
  switch (cpu::simd_level()) {
    case cpu::SimdLevel::kAvx512:
      return "avx512";
    case cpu::SimdLevel::kAvx2:
      return "avx2";
    case cpu::SimdLevel::kGeneric:
      break;
  }
  return "generic";
}
void cpu_force_simd_level_op(std::optional<std::string> level) {
  if (!level) return cpu::force_simd_level(std::nullopt);
  const std::string& l = *level;
  TORCH_CHECK_VALUE(l == "avx512" || l == "avx2" || l == "generic",
                    "cpu_force_simd_level: level must be 'avx512', 'avx2', 'generic' or None, got '", l, "'");
  cpu::force_simd_level(l == "avx512" ? cpu::SimdLevel::kAvx512
                        : l == "avx2" ? cpu::SimdLevel::kAvx2
                                      : cpu::SimdLevel::kGeneric);
}
int64_t cpu_panel_width_op(int64_t m, int64_t gathered_rows, int64_t elem_bytes) {
  return cpu::choose_panel(m, gathered_rows, elem_bytes);
}
void cpu_force_panel_width_op(int64_t t) { cpu::force_panel_width(t); }
bool cpu_is_amd_op() { return cpu::cpu_is_amd(); }
std::string cpu_bf16_step_op() {
  switch (cpu::bf16_step()) {
    case cpu::Bf16Step::kAmx:
      return "amx";
    case cpu::Bf16Step::kDot:
      return "dot";
    case cpu::Bf16Step::kWiden:
      break;
  }
  return "widen";
}
void cpu_force_bf16_step_op(std::optional<std::string> step) {
  if (!step) return cpu::force_bf16_step(std::nullopt);
  const std::string& s = *step;
  TORCH_CHECK_VALUE(s == "amx" || s == "dot" || s == "widen",
                    "cpu_force_bf16_step: step must be 'amx', 'dot', 'widen' or None, got '", s, "'");
  cpu::force_bf16_step(s == "amx" ? cpu::Bf16Step::kAmx : s == "dot" ? cpu::Bf16Step::kDot : cpu::Bf16Step::kWiden);
}
int64_t cpu_sparse24_slice_bytes_op() { return cpu::sparse24_slice_bytes(); }
double cpu_sparse24_loop_gflops_op(int64_t reps) { return cpu::sparse24_loop_gflops(reps); }
void release_workspace_op() { cpu::release_workspace(); }
bool built_with_cuda_op() {
#ifdef SPARSEKERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(sparsekernels_C, m) {
  // y[..., N] = x[..., K] W^T for W = CSR(values, row_ptr, col_idx) of shape [N, K].
  // row_order (GPU only, ignored on the CPU): int32 permutation of the rows, the order in
  // which the kernel takes them (longest first, for load balance). On the GPU col_idx may
  // also be int16 (fewer index bytes); the CPU kernels take int32.
  // tiled (GPU only): the shared-memory tiled kernel for large batches; needs every row's
  // columns in increasing order (the caller checks).
  // bias (optional [N], x's dtype): added to every output row (on the CPU as the output is
  // written, saving a pass over it).
  m.def("spmm(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor? row_order=None, "
        "bool tiled=False, Tensor? bias=None) -> Tensor");
  // dx[..., K] = dy[..., N] W through W^T's CSR (t_row_ptr, t_col_idx, t_perm).
  m.def("spmm_t(Tensor dy, Tensor values, Tensor t_row_ptr, Tensor t_col_idx, Tensor t_perm, "
        "Tensor? row_order=None, bool tiled=False) -> Tensor");
  // dvalues[nnz] = (dy^T x) sampled at W's pattern.
  m.def("sddmm(Tensor dy, Tensor x, Tensor row_ptr, Tensor col_idx, Tensor? row_order=None) -> Tensor");
  // The k inactive positions of W [N, K] (pattern row_ptr/col_idx) with the largest
  // |dy^T x|, computed tile by tile (tile_elems gradient entries at a time), never dense.
  // Returns (rows int64 [k], cols int64 [k], scores [k]), highest score first.
  m.def("topk_grow(Tensor dy, Tensor x, Tensor row_ptr, Tensor col_idx, int k, int tile_elems) -> (Tensor, Tensor, Tensor)");
  // y[..., N] = x[..., K] W^T for a 2:4 weight: values [N, K/2], meta [N, K/4] (uint8,
  // kept positions i0 | i1 << 2 of each group of 4 along a row).
  m.def("sparse24_mm(Tensor x, Tensor values, Tensor meta, Tensor? bias=None) -> Tensor");
  // 2:4 prune (magnitude; transposable: 2:4 along rows and columns of each 4x4 tile) and
  // compress in one pass: (values [N, K/2], meta [N, K/4] uint8, mask [N, K] bool).
  m.def("sparse24_compress(Tensor weight, bool transposable) -> (Tensor, Tensor, Tensor)");
  // True when the CPU kernels run their AVX-512 path on this machine.
  m.def("cpu_has_avx512() -> bool", &cpu_has_avx512_op);
  // The instruction set the fp32 CPU kernels run: "avx512", "avx2" (AVX2 + FMA) or
  // "generic" (portable loops): the CPU's best, or lower where forced.
  m.def("cpu_simd_level() -> str", &cpu_simd_level_op);
  // For tests: caps the CPU kernels' instruction set at `level` ("avx512", "avx2",
  // "generic"; a level above the CPU's runs the CPU's), or the CPU's best again for None.
  m.def("cpu_force_simd_level(str? level) -> ()", &cpu_force_simd_level_op);
  // The batch-panel width the CPU CSR kernels use for M batch rows gathering from a panel
  // of `gathered_rows` rows of `elem_bytes` values (sized to this CPU's L2).
  m.def("cpu_panel_width(int m, int gathered_rows, int elem_bytes) -> int", &cpu_panel_width_op);
  // For tests: the CSR products (spmm, spmm_t, sddmm, spmm_backward) run `width`-wide
  // panels (16, 32, 64) for batches over 16 rows, or the CPU's rule again for 0.
  m.def("cpu_force_panel_width(int width) -> ()", &cpu_force_panel_width_op);
  // True on an AMD CPU, where some kernels block differently (csr_common.h).
  m.def("cpu_is_amd() -> bool", &cpu_is_amd_op);
  // How the CPU 2:4 kernel multiplies a few bf16 rows here: "amx" (AMX tiles), "dot"
  // (AVX512-BF16 dot products) or "widen" (fp32 FMAs).
  m.def("cpu_bf16_step() -> str", &cpu_bf16_step_op);
  // For tests: caps that step ("amx", "dot", "widen"; one above the CPU's runs the CPU's),
  // or the CPU's best again for None.
  m.def("cpu_force_bf16_step(str? step) -> ()", &cpu_force_bf16_step_op);
  // Bytes of the packed panel one K slice of the CPU 2:4 kernel covers (for tests).
  m.def("cpu_sparse24_slice_bytes() -> int", &cpu_sparse24_slice_bytes_op);
  // Useful GFLOP/s of the CPU 2:4 forward's fp32 row loop with its data in L1, every
  // thread running it `reps` times over one K slice (the benchmark's ceiling).
  m.def("cpu_sparse24_loop_gflops(int reps) -> float", &cpu_sparse24_loop_gflops_op);
  // True when the CUDA kernels were compiled into this library.
  m.def("built_with_cuda() -> bool", &built_with_cuda_op);
  // Frees the calling thread's cached scratch buffers (packed panels).
  m.def("release_workspace() -> ()", &release_workspace_op);
}

}  // namespace sparsekernels

// `import sparsekernels._C` loads this library (and so runs the registrations above);
// the module itself holds nothing.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
