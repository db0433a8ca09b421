"""Per-layer sparsity for a global target: uniform, or ERK (Evci et al. 2020, RigL)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..formats import check_sparsity

DISTRIBUTIONS = ("uniform", "erk")


def layer_sparsities(shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str = "uniform",
                     erk_power_scale: float = 1.0) -> dict[str, float]:
    """Sparsity of each layer so that the whole set has ``sparsity`` overall.

    Args:
        shapes: layer name -> weight shape ([out, in] or [out, in/groups, kh, kw]).
        sparsity: global target in [0, 1).
        distribution: ``"uniform"`` (every layer at ``sparsity``) or ``"erk"``: density
            proportional to (sum of the shape's dims) / (product of the dims), raised to
            ``erk_power_scale``, scaled to hit the global target; layers that would exceed
            density 1 are made dense and the rest rescaled (as in RigL's code).
    """
    sparsity = check_sparsity(sparsity)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if distribution == "uniform":
        return {name: sparsity for name in shapes}
    if (isinstance(erk_power_scale, bool) or not isinstance(erk_power_scale, (int, float))
            or not math.isfinite(erk_power_scale) or erk_power_scale < 0):
        raise ValueError(f"erk_power_scale must be a finite number >= 0, got {erk_power_scale!r}")

    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: (sum(shape) / math.prod(shape)) ** erk_power_scale if numel[name] else 0.0
           for name, shape in shapes.items()}
    target_nnz = (1.0 - sparsity) * sum(numel.values())
    dense: set[str] = set()
    while True:
        budget = target_nnz - sum(numel[n] for n in dense)
        weighted = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        if weighted <= 0:
            break
        eps = budget / weighted
        over = [n for n in shapes if n not in dense and eps * raw[n] > 1.0]
        if not over:
            break
        # Cap the largest raw density first, as RigL does, then rescale the rest.
        top = max(raw[n] for n in over)
        dense.update(n for n in over if raw[n] == top)
    out = {}
    for name in shapes:
        # A layer with no weights (a zero dimension) has nothing to prune: sparsity 0.
        empty = numel[name] == 0
        density = 1.0 if name in dense or empty else min(1.0, eps * raw[name]) if weighted > 0 else 1.0
        out[name] = max(0.0, 1.0 - density)
    return out
