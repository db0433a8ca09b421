"""SPDY's dynamic program: one sparsity level per layer, least total error within a time
budget.

Frantar & Alistarh, "SPDY: Accurate Pruning with Speedup Guarantees", ICML 2022 (Section
3.1). Given per layer l and level i an error ``costs[l, i]`` (c_l · e(s_i)) and a time
``times[l, i]`` (seconds), choose i_l for every layer to

    minimise Σ_l costs[l, i_l]   subject to   Σ_l times[l, i_l] <= budget.

Time is discretised into ``buckets`` equal steps of budget / buckets (the paper uses
10⁴). Each time is rounded UP to whole steps, so a plan that fits in the discretised
problem also fits the real budget (the rounding costs at most one step per layer, i.e.
layers / buckets of the budget). DP[l, b] is the least error of layers 0..l taking exactly
b steps; each layer is a vectorised min over its levels, O(layers · levels · buckets).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_int

DEFAULT_BUCKETS = 10_000


def _matrix(values) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float64, device="cpu")


def discretise(times, budget: float, buckets: int) -> Tensor:
    """``times`` [layers, levels] seconds -> whole steps of budget / buckets, rounded up
    (int64; a time above the budget maps to buckets + 1: never fits)."""
    step = budget / buckets
    return torch.ceil(_matrix(times) / step).clamp(max=buckets + 1).to(torch.int64)


def solve(costs, times, budget: float, buckets: int = DEFAULT_BUCKETS) -> tuple[list[int], float] | None:
    """The least-error choice of one level per layer within ``budget``.

    Args:
        costs: [layers, levels] errors (finite, any sign); a tensor, array or nested list
            (computed in float64 on the CPU).
        times: [layers, levels] seconds, >= 0.
        budget: seconds > 0 for the sum of the chosen times.
        buckets: number of time steps the budget is divided into.
    Returns: (level index per layer, total cost), or None when no choice fits (even the
    fastest level of every layer, after rounding up, exceeds the budget). Ties go to the
    lower level index, then to the shorter total time.
    """
    costs, times = _matrix(costs), _matrix(times)
    if costs.dim() != 2 or costs.shape != times.shape or costs.shape[0] == 0 or costs.shape[1] == 0:
        raise ValueError(f"solve: costs and times must both be [layers, levels] with layers, levels >= 1, got "
                         f"{tuple(costs.shape)} and {tuple(times.shape)}")
    if not (bool(torch.isfinite(costs).all()) and bool(torch.isfinite(times).all())) or bool((times < 0).any()):
        raise ValueError("solve: costs must be finite and times finite and >= 0")
    if not budget > 0:
        raise ValueError(f"solve: budget must be > 0, got {budget!r}")
    check_int("buckets", buckets, "solve")
    steps = discretise(times, budget, buckets).tolist()
    cost = costs.tolist()
    layers, levels = costs.shape
    width = buckets + 1
    best = torch.full((width,), torch.inf, dtype=torch.float64)
    best[0] = 0.0
    choice = torch.full((layers, width), -1, dtype=torch.int64)
    for layer in range(layers):
        nxt = torch.full((width,), torch.inf, dtype=torch.float64)
        for level in range(levels):
            d = steps[layer][level]
            if d >= width:
                continue
            cand = best[:width - d] + cost[layer][level]
            better = cand < nxt[d:]
            nxt[d:] = torch.where(better, cand, nxt[d:])
            choice[layer, d:] = torch.where(better, level, choice[layer, d:])
        best = nxt
    if not bool(torch.isfinite(best).any()):
        return None
    b = int(torch.argmin(best))  # the first minimum: the shortest time among equal costs
    total = float(best[b])
    plan = [0] * layers
    for layer in range(layers - 1, -1, -1):
        level = int(choice[layer, b])
        plan[layer] = level
        b -= steps[layer][level]
    return plan, total
