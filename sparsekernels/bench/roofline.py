"""Where the CPU CSR forward's time goes: a gather roofline measured in the run.

The C++ forward (``csrc/cpu/spmm.cpp``) packs x into panels of T batch columns
(T = 16 for B <= 16, else 64 on Intel and 32 on AMD, narrower for wide inputs) and,
for every non-zero of every panel, reads one T-float row of the panel (a "gather", 4T
bytes) and does T FMAs with it. Its time is therefore about ``gathers x (time per
gather)`` with ``gathers = nnz x panels``. The time per gather depends on where the
gathered rows come from: a 4096-wide input's panel is 1 MiB, so they come from L2.

This module measures, in the same process and thread count as the benchmark, the
time per gather of the same kernel when every gathered row is in L1 (a dense-pattern
probe weight whose panel fits in half the L1D), from the slope between two probe
widths so that packing and the output store cancel out. That is the instruction mix's
own limit. With it a case reports:

- ``ns_per_gather``: the benchmark's measured forward / gathers (everything included);
- ``l1_ns_per_gather``: the L1-resident probe's slope;
- ``needed_ns_per_gather``: what a target ratio against dense would allow;
- ``gather_gb_per_s``: panel bytes delivered to the FMAs per second in the measured run;
- ``ceiling_if_l1``: dense time / (gathers x L1 time per gather), an upper bound of the
  ratio any reordering of this kernel's loads could reach (fixed costs left out).

Bytes are counted for fp32 panels (the CSR benchmark's dtype). The benchmark computes the
roofline only for cases where measured "auto" ran our kernel (``fwd_backend == "cpu"``).

A target with ``needed < l1`` is out of reach for this instruction mix; one with
``l1 <= needed < measured`` needs the gathered rows served from L1 instead of L2.
``marginal_ns_per_gather`` measures what one more gather costs in a case (its pattern
against every other non-zero of it, interleaved: fixed costs and drift cancel) and
``add_marginal`` the ratio that allows with no fixed cost at all;
``sparse24_limits`` the 2:4 forward's rate and, from ``sparse24_loop_gflops`` (the
kernel's row loop with its data in L1), the 2:4 speed-up that loop allows at best.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from . import harness

# csrc/cpu/csr_common.h: the 2:4 kernel's batch-only choose_panel(m) on an AVX-512 CPU, and
# the CSR widths assumed without the extension (its rule is per CPU: cpu_panel_width).
WIDE_PANEL, MID_PANEL, NARROW_PANEL = 64, 32, 16
# csrc/cpu/csr_common.h (kFewRowsCsr, kFewRows): batches of up to this many rows skip the
# panels (the CSR products, the 2:4 product), so no panel roofline describes them.
FEW_ROWS_CSR, FEW_ROWS_24 = 2, 8


def _batch_rule_width(batch: int) -> int:
    """16 columns for batches of up to 16 rows, 32 up to 32, else 64: the 2:4 kernel's
    panels on an AVX-512 CPU, and the CSR kernels' where the extension is not loaded."""
    return NARROW_PANEL if batch <= NARROW_PANEL else MID_PANEL if batch <= MID_PANEL else WIDE_PANEL


def sparse24_panel_width(batch: int) -> int:
    """The batch-panel width of the compiled 2:4 forward (csr_common.cpp: choose_panel(m)):
    the batch rule, capped at 32 where the extension's fp32 kernels do not run AVX-512
    (``widest_panel``: with AVX2's 16 registers a 64-wide row's accumulators take half of
    them); the batch rule alone where the extension is not loaded."""
    from .. import _extension

    width = _batch_rule_width(batch)
    if _extension.compiled() and _extension.cpu_simd_level() != "avx512":
        width = min(width, MID_PANEL)
    return width


def panel_width(batch: int, in_features: int | None = None) -> int:
    """The batch-panel width the compiled forward uses for x [batch, in_features] (fp32;
    None: a narrow input): the extension's own rule (``cpu_panel_width``: on Intel 64, or
    32 / 16 where a 64-wide panel of in_features rows would not fit the L2; on AMD 32, or
    16) when it is loaded, else 16 / 64 by batch."""
    from .. import _extension

    if _extension.compiled() and hasattr(torch.ops.sparsekernels_C, "cpu_panel_width"):
        return int(torch.ops.sparsekernels_C.cpu_panel_width(batch, in_features or 1, 4))
    return _batch_rule_width(batch)


def gathers(batch: int, nnz: int, in_features: int | None = None) -> int:
    """Panel rows the forward reads: one per non-zero per panel."""
    return nnz * math.ceil(batch / panel_width(batch, in_features))


def _dense_pattern(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    row_ptr = torch.arange(rows + 1, dtype=torch.int32) * cols
    col_idx = torch.arange(cols, dtype=torch.int32).repeat(rows)
    values = torch.randn(rows * cols)
    return values, row_ptr, col_idx


def _slope_ns(small, large, extra_gathers: int, rounds: int) -> float | None:
    """ns per gather between two forwards timed in interleaved rounds (best of each):
    (large - small) / the gathers ``large`` does more. A non-positive slope is noise that
    swamped the difference: None rather than 0."""
    with torch.no_grad():
        samples = harness.time_round_robin({"small": small, "large": large}, max(rounds, 15))
    slope = (min(samples["large"]) - min(samples["small"])) / extra_gathers * 1e9
    return slope if slope > 0 else None


def l1_ns_per_gather(batch: int, out_f: int, l1d_kib: int | None, rounds: int) -> float | None:
    """Time per gather of the compiled forward with the panel in L1 (slope between two
    probe widths that fit in half the L1D), or None without the extension."""
    from .. import _extension

    if not _extension.compiled():
        return None
    t = panel_width(batch)
    fit = max(8, (l1d_kib or 32) * 1024 // 2 // (4 * t))   # panel rows in half the L1D
    widths = (fit // 2, fit)
    kernel = torch.ops.sparsekernels_C.spmm
    fns = {}
    for k in widths:
        values, row_ptr, col_idx = _dense_pattern(out_f, k)
        x = torch.randn(batch, k)
        fns[k] = (lambda x=x, v=values, rp=row_ptr, ci=col_idx: kernel(x, v, rp, ci, None, False))
    extra = gathers(batch, out_f * widths[1]) - gathers(batch, out_f * widths[0])
    # The slope also carries the per-task pattern check (as the measured run does).
    return _slope_ns(fns[widths[0]], fns[widths[1]], extra, rounds)


def case_limits(batch: int, nnz: int, dense_ms: float, ours_ms: float, l1_ns: float | None,
                goals: dict[str, float], in_features: int | None = None) -> dict:
    """The roofline quantities of one measured case (see the module docstring). The L1
    probe runs the panel width of a narrow input; for a case whose input is wide enough
    to get a narrower panel (``panel_width``) it does not apply, and is left out."""
    g = gathers(batch, nnz, in_features)
    width = panel_width(batch, in_features)
    if width != panel_width(batch):
        l1_ns = None
    out = {
        "panel_width": width,
        "gathers": g,
        "gathered_gb": g * 4 * width / 1e9,
        "ns_per_gather": ours_ms * 1e6 / g,
        "gather_gb_per_s": g * 4 * width / (ours_ms * 1e-3) / 1e9,
        "needed_ns_per_gather": {name: dense_ms * 1e6 / goal / g for name, goal in goals.items()},
        "l1_ns_per_gather": l1_ns,
        "ceiling_if_l1": None if not l1_ns else dense_ms * 1e6 / (g * l1_ns),
    }
    return out


def half_pattern(values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor):
    """Every other non-zero of each row (the 1st, 3rd, ...): (values, row_ptr, col_idx) of
    a pattern with the same rows, columns and panel and about half the gathers."""
    counts = row_ptr[1:].long() - row_ptr[:-1].long()
    row_of = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    keep = (torch.arange(col_idx.numel()) - row_ptr[:-1].long()[row_of]) % 2 == 0
    half_ptr = torch.zeros_like(row_ptr)
    half_ptr[1:] = torch.cumsum((counts + 1) // 2, 0).to(row_ptr.dtype)
    return values[keep].contiguous(), half_ptr, col_idx[keep].contiguous()


def marginal_ns_per_gather(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                           rounds: int) -> float | None:
    """What one more gather costs in this case: the compiled forward on the case's pattern
    and on every other non-zero of it (``half_pattern``), timed in interleaved rounds, the
    slope between them. Packing, the output store, the checks and drift of the machine
    cancel; what is left is the gathers at this case's panel (from L2 for a 4096-wide
    input). None without the extension or when noise swamped the slope."""
    from .. import _extension

    if not _extension.compiled() or col_idx.numel() < 2:
        return None
    kernel = torch.ops.sparsekernels_C.spmm
    hv, hrp, hci = half_pattern(values, row_ptr, col_idx)
    batch, k = x.shape[0], x.shape[-1]
    extra = gathers(batch, col_idx.numel(), k) - gathers(batch, hci.numel(), k)
    return _slope_ns(lambda: kernel(x, hv, hrp, hci, None, False), lambda: kernel(x, values, row_ptr, col_idx, None, False),
                     extra, rounds)


def add_marginal(limits: dict, marginal_ns: float | None, dense_ms: float) -> None:
    """Adds ``marginal_ns_per_gather`` and ``ceiling_at_marginal`` = dense / (gathers x
    marginal): the ratio this case would reach with every fixed cost removed. A target
    above it needs cheaper gathers (rows from L1), not less overhead."""
    if marginal_ns is None or not limits:
        return
    limits["marginal_ns_per_gather"] = marginal_ns
    limits["ceiling_at_marginal"] = dense_ms * 1e6 / (limits["gathers"] * marginal_ns)


def sparse24_loop_gflops(rounds: int = 5, seconds_per_call: float = 0.01) -> float | None:
    """Useful GFLOP/s of the compiled 2:4 forward's fp32 row loop with its data in L1, all
    threads (``cpu_sparse24_loop_gflops``): the median of ``max(5, rounds // 3)`` calls of
    about ``seconds_per_call`` each. None without the extension."""
    from .. import _extension

    if not _extension.compiled() or not hasattr(torch.ops.sparsekernels_C, "cpu_sparse24_loop_gflops"):
        return None
    probe = torch.ops.sparsekernels_C.cpu_sparse24_loop_gflops
    reps = 200
    # Calibrated on a warm call: the first one also wakes the threads.
    probe(reps)
    t0 = time.perf_counter()
    probe(reps)
    once = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, int(reps * seconds_per_call / once))
    return statistics.median(probe(reps) for _ in range(max(5, rounds // 3)))


def sparse24_limits(batch: int, in_features: int, out_features: int, dense_ms: float, ours_ms: float,
                    loop_gflops: float | None = None) -> dict:
    """The 2:4 forward's rate (``csrc/cpu/sparse24_mm.cpp``): each kept weight of each
    panel is one T-float row read from a K slice (L1-sized on Intel, a quarter of the L2 on
    AMD) and T FMAs; ``gathers`` is kept weights x panels, ``ns_per_gather`` the measured
    forward per one of them, and ``fma_rate_vs_dense`` our useful FMAs per second over
    dense's (the 2:4 speed-up is twice that). With ``loop_gflops`` (``sparse24_loop_gflops``,
    the kernel's own row loop with x, values and meta in L1): ``loop_ceiling_vs_dense``, the
    speed-up no plan of that loop can pass (the products at the loop's rate against this
    run's dense time), and ``share_of_loop_rate``, the part of it the forward reached."""
    # The 2:4 kernel's panels follow the batch and the SIMD level alone (csr_common.h:
    # choose_panel(m)), for every input width.
    width = sparse24_panel_width(batch)
    products = out_features * in_features // 2 * math.ceil(batch / width)
    out = {"panel_width": width, "gathers": products, "ns_per_gather": ours_ms * 1e6 / products,
           "fma_rate_vs_dense": dense_ms / (2.0 * ours_ms)}
    if loop_gflops:
        # The loop's FLOPs count every lane of a panel row, as the kernel's do.
        ceiling_ms = 2.0 * products * width / (loop_gflops * 1e9) * 1e3
        out.update(loop_gflops=loop_gflops, loop_ceiling_vs_dense=dense_ms / ceiling_ms,
                   share_of_loop_rate=ceiling_ms / ours_ms)
    return out
