"""Peak memory of the one-shot pruners, measured from torch's own allocation records.

The profiler's memory events carry the allocator's running total of live bytes; its
maximum over a call, relative to the start, is the call's peak working memory (inputs
allocated before the call are not counted). Works on the CPU, where torch has no
``max_memory_allocated``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

import torch

from .._checks import check_int
from .sparsegpt import sparsegpt_prune


def peak_allocated_bytes(fn: Callable, *args, **kwargs) -> tuple[object, int]:
    """Runs ``fn(*args, **kwargs)``; returns (its result, peak bytes torch allocated during
    the call beyond what was live before it)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        result = fn(*args, **kwargs)
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return result, max([0, *totals])


def sparsegpt_peak_memory(k: int, rows: int | None = None, *, sparsity: float = 0.5,
                          dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Peak working memory of :func:`sparsegpt_prune` on a ``rows`` x ``k`` layer (rows
    defaults to k) with a random positive definite Hessian.

    Returns ``{"k", "rows", "peak_bytes", "per_k2"}``; ``per_k2`` = peak / (k² · itemsize),
    which stays bounded as k grows when the memory is O(k²) (for rows ≈ k).
    """
    rows = k if rows is None else rows
    for name, value in (("k", k), ("rows", rows)):
        check_int(name, value, "sparsegpt_peak_memory")
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, k, generator=g, dtype=dtype)
    X = torch.randn(64, k, generator=g, dtype=dtype)
    H = X.t() @ X / 64
    H.diagonal().add_(1.0)
    del X
    _, peak = peak_allocated_bytes(sparsegpt_prune, W, H, sparsity)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return {"k": k, "rows": rows, "peak_bytes": peak, "per_k2": peak / (k * k * itemsize)}
