"""GPU benchmark of the CSR kernels (run by bench/gpu_check.sh on a lent GPU machine).

Per (B, in, out) and sparsity, in one run and interleaved: cuBLAS dense (fp32 with TF32
off, fp32 with TF32 on, bf16), cuSPARSE (``torch.sparse.mm`` on a torch CSR tensor), and
our backends (CUDA C++, Triton), forward and full layer step. Every case records the
floor: max(FLOPs / measured peak, bytes / measured bandwidth), peaks measured on the
machine in the same run, so the distance to the hardware limit is visible.
"""

from __future__ import annotations

import copy
import statistics
import warnings

import torch

from .. import ops
from ..kernels.launch_plan import INT16_MAX_COLS, launch_plan, rows_sorted
from ..backends import available, measured, use_backend
from ..nn import SparseLinear
from . import harness

SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (2048, 4096, 4096), (8192, 4096, 11008)]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98]
QUICK_SPARSITIES = [0.9, 0.98]


def _cuda_time(fn, reps: int = 10, warmup: int = 3, budget_s: float = 2.0) -> list[float]:
    """Seconds per call, one sample per rep, timed with CUDA events. Slow calls get fewer
    reps (about ``budget_s`` per variant) so one slow kernel cannot eat the machine's
    10-minute command limit."""
    fn()  # untimed: Triton compiles and "auto" measures on a first call
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = start.elapsed_time(end) / 1e3
    if once * (warmup + reps) > budget_s:
        warmup, reps = 0, max(1, int(budget_s / max(once, 1e-9)))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return samples


def measure_peaks() -> dict:
    """Dense bf16 / fp32 (TF32 off) GEMM FLOP/s and device-memory bandwidth, measured."""
    n = 8192
    out = {}
    for name, dtype, tf32 in (("bf16_flops", torch.bfloat16, False), ("fp32_flops", torch.float32, False),
                              ("tf32_flops", torch.float32, True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        t = min(_cuda_time(lambda: a @ b, reps=5))
        out[name] = 2 * n**3 / t
    torch.backends.cuda.matmul.allow_tf32 = False
    big = torch.empty(512 * 2**20 // 4, device="cuda")
    dst = torch.empty_like(big)
    t = min(_cuda_time(lambda: dst.copy_(big), reps=5))
    out["bandwidth"] = 2 * big.numel() * 4 / t
    return out


def run_case(batch: int, in_f: int, out_f: int, sparsity: float, peaks: dict, reps: int = 10) -> dict:
    torch.manual_seed(0)
    layer32 = SparseLinear(in_f, out_f, sparsity=sparsity, device="cuda")
    dense32 = layer32.to_dense()
    w32 = dense32.weight.detach()
    w16 = w32.bfloat16()
    x32 = torch.randn(batch, in_f, device="cuda")
    x16 = x32.bfloat16()
    pattern = (layer32.row_ptr, layer32.col_idx, layer32.t_row_ptr, layer32.t_col_idx, layer32.t_perm)
    v32, v16 = layer32.values.detach(), layer32.values.detach().bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w_csr = w32.to_sparse_csr()

    def tf32(on):
        def f():
            torch.backends.cuda.matmul.allow_tf32 = on
            return x32 @ w32.t()
        return f

    fns = {"cublas_fp32": tf32(False), "cublas_tf32": tf32(True), "cublas_bf16": lambda: x16 @ w16.t(),
           "cusparse_fp32": lambda: torch.sparse.mm(w_csr, x32.t()).t()}
    layer16 = copy.deepcopy(layer32).to(torch.bfloat16)
    dense16 = copy.deepcopy(dense32).to(torch.bfloat16)
    dy32 = torch.randn(batch, out_f, device="cuda")
    dy16 = dy32.bfloat16()

    def step_of(module, x, dy, backend=None):
        step = harness.layer_step(module, x, dy, backend=backend)

        def f():
            torch.backends.cuda.matmul.allow_tf32 = False  # the TF32 baseline above turns it on
            step()
        return f

    # "auto" is the measured choice (backends.dispatch): the first call measures.
    for backend in [b for b in ("cuda", "triton") if b in available("cuda")] + ["auto"]:
        def ours(x, v, backend=backend):
            def f():
                with use_backend(backend):
                    return ops.spmm(x, v, *pattern)
            return f
        fns[f"{backend}_fp32"] = ours(x32, v32)
        fns[f"{backend}_bf16"] = ours(x16, v16)
        fns[f"{backend}_step_fp32"] = step_of(layer32, x32, dy32, backend)
        fns[f"{backend}_step_bf16"] = step_of(layer16, x16, dy16, backend)
    # The compiled CUDA op called alone (no Python around it): the strip kernel ("kernel")
    # and the shared-memory tiled one (auto measures it from B = 256 on; up to B = 32 both
    # run the small-batch kernel). Against "cuda_*" they show what the Python costs.
    if "cuda" in available("cuda"):
        order, cols = launch_plan(layer32.row_ptr, layer32.col_idx, in_f)
        compiled = torch.ops.sparsekernels_C.spmm
        fns["cuda_kernel_fp32"] = lambda: compiled(x32, v32, layer32.row_ptr, cols, order, False)
        fns["cuda_kernel_bf16"] = lambda: compiled(x16, v16, layer32.row_ptr, cols, order, False)
        if rows_sorted(layer32.row_ptr, layer32.col_idx):
            fns["cuda_tiled_fp32"] = lambda: compiled(x32, v32, layer32.row_ptr, cols, order, True)
            fns["cuda_tiled_bf16"] = lambda: compiled(x16, v16, layer32.row_ptr, cols, order, True)
    fns["cublas_step_fp32"] = step_of(dense32, x32, dy32)
    fns["cublas_step_bf16"] = step_of(dense16, x16, dy16)

    times = {k: statistics.median(_cuda_time(f, reps)) for k, f in fns.items()}
    torch.backends.cuda.matmul.allow_tf32 = False
    nnz = layer32.nnz
    flop_dense, flop_sparse = 2.0 * batch * in_f * out_f, 2.0 * batch * nnz
    # Floor of our forward: sparse FLOPs at the fp32 CUDA-core peak, or the bytes of values
    # + column indices (int16 when in_features fits, as the CUDA kernel reads them) + x + y
    # at the measured bandwidth, whichever is larger.
    idx_bytes = 2 if in_f <= INT16_MAX_COLS else 4
    floor = {"fp32_fwd_s": max(flop_sparse / peaks["fp32_flops"],
                               (nnz * (4 + idx_bytes) + (batch * in_f + batch * out_f) * 4) / peaks["bandwidth"]),
             "bf16_fwd_s": max(flop_sparse / peaks["fp32_flops"],
                               (nnz * (2 + idx_bytes) + (batch * in_f + batch * out_f) * 2) / peaks["bandwidth"])}
    speed = {}
    if "cuda_kernel_fp32" in times:
        speed["cuda_kernel_fwd_fp32_vs_cublas_fp32"] = times["cublas_fp32"] / times["cuda_kernel_fp32"]
        speed["cuda_kernel_fwd_bf16_vs_cublas_bf16"] = times["cublas_bf16"] / times["cuda_kernel_bf16"]
    if "cuda_tiled_fp32" in times:
        speed["cuda_tiled_fwd_fp32_vs_cublas_fp32"] = times["cublas_fp32"] / times["cuda_tiled_fp32"]
        speed["cuda_tiled_fwd_bf16_vs_cublas_bf16"] = times["cublas_bf16"] / times["cuda_tiled_bf16"]
        speed["cuda_tiled_fwd_fp32_vs_cusparse"] = times["cusparse_fp32"] / times["cuda_tiled_fp32"]
    for backend in ("cuda", "triton", "auto"):
        if f"{backend}_fp32" in times:
            speed[f"{backend}_step_bf16_vs_cublas_bf16"] = times["cublas_step_bf16"] / times[f"{backend}_step_bf16"]
            speed[f"{backend}_fwd_fp32_vs_cublas_fp32"] = times["cublas_fp32"] / times[f"{backend}_fp32"]
            speed[f"{backend}_fwd_fp32_vs_cusparse"] = times["cusparse_fp32"] / times[f"{backend}_fp32"]
            speed[f"{backend}_fwd_bf16_vs_cublas_bf16"] = times["cublas_bf16"] / times[f"{backend}_bf16"]
            speed[f"{backend}_step_fp32_vs_cublas_fp32"] = times["cublas_step_fp32"] / times[f"{backend}_step_fp32"]
    return {"batch": batch, "in_features": in_f, "out_features": out_f, "sparsity": sparsity, "nnz": nnz,
            "ms": {k: v * 1e3 for k, v in times.items()}, "speedup": speed,
            "floor_ms": {k: v * 1e3 for k, v in floor.items()},
            "dense_tflops_fp32": flop_dense / times["cublas_fp32"] / 1e12}


def run_bsr_case(batch: int = 2048, in_f: int = 4096, out_f: int = 4096, block: int = 32, sparsity: float = 0.9,
                 reps: int = 10) -> dict:
    """Triton BSR forward in bf16 against cuBLAS bf16 (issue target: >= 3x at 90% blocks)."""
    from ..formats import BSR, kept_count
    from ..ops import bsr_mm

    torch.manual_seed(0)
    nbr, nbc = out_f // block, in_f // block
    block_mask = torch.zeros(nbr * nbc, dtype=torch.bool)
    block_mask[torch.randperm(nbr * nbc)[:kept_count(nbr * nbc, sparsity)]] = True
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
    bsr = BSR.from_dense(w, block_mask.view(nbr, nbc).cuda(), block)
    x = torch.randn(batch, in_f, device="cuda", dtype=torch.bfloat16)
    wd = bsr.to_dense()
    err = ((bsr_mm(x, bsr.values, *bsr.pattern()).float() - (x @ wd.t()).float()).norm() / (x @ wd.t()).float().norm()).item()

    def ours():
        with use_backend("triton"):
            return bsr_mm(x, bsr.values, *bsr.pattern())
    t_ours = statistics.median(_cuda_time(ours, reps))
    t_dense = statistics.median(_cuda_time(lambda: x @ wd.t(), reps))
    return {"batch": batch, "in_features": in_f, "out_features": out_f, "block": block, "sparsity": sparsity,
            "rel_err_vs_dense": err, "ms": {"triton_bsr_bf16": t_ours * 1e3, "cublas_bf16": t_dense * 1e3},
            "speedup_vs_cublas_bf16": t_dense / t_ours}


def run_regrowth_case(out_f: int = 4096, in_f: int = 11008, batch: int = 2048, sparsity: float = 0.9,
                      reps: int = 5) -> dict:
    """Fused topk_grow vs dense gradient + torch.topk (issue target: >= 5x, extra memory
    <= 10% of the dense gradient)."""
    from ..formats import CSR, random_mask
    from ..ops import topk_grow

    torch.manual_seed(0)
    mask = random_mask((out_f, in_f), sparsity).cuda()
    csr = CSR.from_dense(torch.randn(out_f, in_f, device="cuda"), mask)
    dy = torch.randn(batch, out_f, device="cuda")
    x = torch.randn(batch, in_f, device="cuda")
    k = int(0.3 * csr.nnz)

    def dense():
        g = (dy.t() @ x).abs_()
        g[mask] = -1
        return torch.topk(g.view(-1), k)
    t_dense = statistics.median(_cuda_time(dense, reps))
    # Every score |dy^T x| is one entry of that GEMM: a method that computes all of them at
    # the same precision takes at least the GEMM's time, so dense + topk / GEMM bounds
    # the speed-up any such method can show here.
    t_gemm = statistics.median(_cuda_time(lambda: dy.t() @ x, reps))
    t_ours = statistics.median(_cuda_time(lambda: topk_grow(dy, x, csr.row_ptr, csr.col_idx, k), reps))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rows, cols, scores = topk_grow(dy, x, csr.row_ptr, csr.col_idx, k)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # The answer itself (rows and columns int64, scores fp32: 20 bytes per position) is
    # part of that peak when it comes at the end: 15% of the dense gradient at k = 30% of
    # nnz at 90%. Peak minus answer is then the working memory; a peak reached earlier
    # (during a cut of the pool) makes it a lower bound.
    answer = sum(t.numel() * t.element_size() for t in (rows, cols, scores))
    return {"out_features": out_f, "in_features": in_f, "batch": batch, "sparsity": sparsity, "k": k,
            "ms": {"dense_grad_topk": t_dense * 1e3, "dense_grad_gemm": t_gemm * 1e3, "topk_grow": t_ours * 1e3},
            "speedup": t_dense / t_ours, "speedup_bound_all_scores": t_dense / t_gemm,
            "extra_memory_fraction_of_dense_grad": extra / (out_f * in_f * 4),
            "working_memory_fraction_of_dense_grad": (extra - answer) / (out_f * in_f * 4)}


def run_sparse24_cases(reps: int = 10) -> list[dict]:
    """2:4 in bf16 against cuBLAS bf16 and torch's to_sparse_semi_structured (the anchor a
    user has today): forward GEMM at (8192, 8192, 8192) and (8192, 4096, 11008), our
    prune + compress of a 4096 x 11008 weight against one dense forward of that layer, and
    the full Sparse24Linear training step against nn.Linear."""
    from ..formats import compress_24
    from ..nn import Sparse24Linear

    out = []
    # (1 and 16 rows: the compressed-form CUDA kernel; 8192: torch's 2:4 GEMM.)
    for batch, in_f, out_f in ((8192, 8192, 8192), (8192, 4096, 11008), (1, 4096, 4096), (16, 4096, 4096)):
        torch.manual_seed(0)
        # Transposable mask: the input gradient runs on sparse tensor cores too.
        layer = Sparse24Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16, transposable=True)
        srste = Sparse24Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16, mode="srste")
        # SR-STE with a transposable mask: dx on the 2:4 GEMM too (the re-prune every step included).
        srste_t = Sparse24Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16, mode="srste",
                                 transposable=True)
        w = layer.dense_weight()
        x = torch.randn(batch, in_f, device="cuda", dtype=torch.bfloat16)
        w_ss = torch.sparse.to_sparse_semi_structured(w)
        t = {
            "cublas_bf16": statistics.median(_cuda_time(lambda: x @ w.t(), reps)),
            "torch_semi_structured": statistics.median(_cuda_time(lambda: torch.nn.functional.linear(x, w_ss), reps)),
            "ours_fwd": statistics.median(_cuda_time(lambda: layer(x), reps)),
            "ours_prune_compress": statistics.median(_cuda_time(lambda: compress_24(w), reps)),
        }
        dense = torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(batch, out_f, device="cuda", dtype=torch.bfloat16)

        def step(module):  # new values each step, as an optimizer step: 2:4 re-compresses
            return harness.layer_step(module, x, dy, new_values=True)
        t["dense_step"] = statistics.median(_cuda_time(step(dense), reps))
        t["ours_step"] = statistics.median(_cuda_time(step(layer), reps))
        t["ours_srste_step"] = statistics.median(_cuda_time(step(srste), reps))  # re-prunes every step
        t["ours_srste_transposable_step"] = statistics.median(_cuda_time(step(srste_t), reps))
        out.append({"batch": batch, "in_features": in_f, "out_features": out_f,
                    "ms": {k: v * 1e3 for k, v in t.items()},
                    "fwd_vs_cublas_bf16": t["cublas_bf16"] / t["ours_fwd"],
                    "fwd_vs_torch_semi_structured": t["torch_semi_structured"] / t["ours_fwd"],
                    "torch_semi_structured_vs_cublas": t["cublas_bf16"] / t["torch_semi_structured"],
                    "prune_compress_fraction_of_dense_fwd": t["ours_prune_compress"] / t["cublas_bf16"],
                    "step_vs_dense": t["dense_step"] / t["ours_step"],
                    "srste_step_vs_dense": t["dense_step"] / t["ours_srste_step"],
                    "srste_transposable_step_vs_dense": t["dense_step"] / t["ours_srste_transposable_step"]})
    return out


# The cases the targets name, measured first so a short time budget still covers
# them: fp32 / bf16 step at B = 2048 (90%, 98%), the memory-bound bf16 forward (B <= 16).
PRIORITY_CASES = [((2048, 4096, 4096), 0.9), ((2048, 4096, 4096), 0.98), ((1, 4096, 4096), 0.9),
                  ((16, 4096, 4096), 0.9)]


def run(shapes=None, sparsities=None, progress=None, time_budget_s: float = 330.0, checkpoint=None) -> dict:
    """All GPU cases, in this order: the issue's target CSR cases, the BSR / regrowth / 2:4
    cases, then the rest of the CSR sweep. New cases stop starting after ``time_budget_s``
    (the GPU machine allows 10 minutes per command; build and tests run first); skipped
    ones are listed. ``checkpoint(payload)`` is called after every case with the results so
    far, so a command killed at its time limit still leaves them."""
    import time

    if not torch.cuda.is_available():
        raise RuntimeError("the GPU benchmark needs a CUDA device")
    t0 = time.monotonic()
    peaks = measure_peaks()
    results, skipped = [], []
    extra = {}

    def payload() -> dict:
        return {"benchmark": "csr_linear_gpu", "machine": harness.machine_info("cuda"), "peaks": peaks,
                "results": results, "skipped_for_time": skipped, **extra,
                # What "auto" measured and chose per problem class (and any backend it rejected).
                "auto_choices": measured()}

    def done(label: str) -> None:
        if progress is not None:
            progress(label)
        if checkpoint is not None:
            checkpoint(payload())

    sweep = [(shape, s) for shape in shapes or SHAPES for s in sparsities or SPARSITIES]
    first = [c for c in PRIORITY_CASES if c in sweep]
    rest = [c for c in sweep if c not in first]

    def csr_cases(cases):
        for shape, s in cases:
            if time.monotonic() - t0 > time_budget_s:
                skipped.append({"shape": shape, "sparsity": s})
                continue
            try:
                results.append(run_case(*shape, s, peaks))
            except Exception as exc:  # record it and keep measuring the other cases
                results.append({"batch": shape[0], "in_features": shape[1], "out_features": shape[2], "sparsity": s,
                                "error": f"{type(exc).__name__}: {exc}", "speedup": {}})
            done(f"{shape} s={s}")

    csr_cases(first)
    for name, fn in (("bsr", run_bsr_case), ("regrowth", run_regrowth_case), ("sparse24", run_sparse24_cases)):
        if time.monotonic() - t0 > time_budget_s:
            extra[name] = {"skipped_for_time": True}
            continue
        try:
            extra[name] = fn()
        except Exception as exc:  # record and go on: one failure must not lose the rest
            extra[name] = {"error": f"{type(exc).__name__}: {exc}"}
        done(name)
    csr_cases(rest)
    return payload()
