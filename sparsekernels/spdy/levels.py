"""The sparsity grid SPDY chooses from, and its error prior.

SPDY (Frantar & Alistarh, "SPDY: Accurate Pruning with Speedup Guarantees", ICML 2022)
picks one of L sparsity levels s_0 < s_1 < ... < s_{L-1} per layer. The paper uses 40
levels up to 0.99; here the default grid is geometric in the density,

    s_i = 1 − (1 − s_max)^(i / (L − 1)),   i = 0 .. L−1,   s_max = 0.99,

so s_0 = 0 (the dense layer) and every step removes the same fraction (about 11% for
L = 40) of the weights the previous level kept: fine steps where the kernel time changes
fast (high sparsity), coarse ones where it barely matters.

The error prior of level i is e(s_i) = (i / (L − 1))²: 0 for the dense layer, 1 at the
sparsest level. The dynamic program minimises Σ_l c_l · e(s_{i_l}); the search over the
per-layer sensitivities c_l supplies what the prior does not know about each layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._checks import check_int

DEFAULT_LEVELS = 40
MAX_SPARSITY = 0.99


def default_levels(count: int = DEFAULT_LEVELS, max_sparsity: float = MAX_SPARSITY) -> tuple[float, ...]:
    """``count`` >= 2 levels from 0 to ``max_sparsity`` (in (0, 1)), geometric in the density."""
    check_int("count", count, "default_levels", minimum=2)
    if (isinstance(max_sparsity, bool) or not isinstance(max_sparsity, (int, float))
            or not 0.0 < max_sparsity < 1.0):
        raise ValueError(f"default_levels: max_sparsity must be in (0, 1), got {max_sparsity!r}")
    return tuple(1.0 - (1.0 - max_sparsity) ** (i / (count - 1)) for i in range(count))


def check_levels(levels: object, owner: str = "spdy") -> tuple[float, ...]:
    """The sparsity grid from ``levels``: an int L >= 2 (:func:`default_levels`) or a
    strictly increasing sequence of sparsities in [0, 1). 0 (the dense layer, always an
    option) is put in front when the sequence does not start with it.

    Raises TypeError / ValueError naming ``levels``."""
    if isinstance(levels, bool):
        raise TypeError(f"{owner}: levels must be an int >= 2 or a sequence of sparsities, got {levels!r}")
    if isinstance(levels, int):
        if levels < 2:
            raise ValueError(f"{owner}: levels must be >= 2 (the dense level and at least one sparsity), got {levels}")
        return default_levels(levels)
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise TypeError(f"{owner}: levels must be an int >= 2 or a sequence of sparsities, got "
                        f"{type(levels).__name__}")
    values = []
    for v in levels:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise TypeError(f"{owner}: levels must hold finite numbers, got {v!r}")
        values.append(float(v))
    if not values:
        raise ValueError(f"{owner}: levels is empty; give at least one sparsity in (0, 1)")
    if min(values) < 0 or max(values) >= 1:
        raise ValueError(f"{owner}: levels must lie in [0, 1) (1 would remove every weight), got min "
                         f"{min(values)!r}, max {max(values)!r}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{owner}: levels must be strictly increasing, got {values}")
    if values[0] > 0:
        values.insert(0, 0.0)
    if len(values) < 2:
        raise ValueError(f"{owner}: levels must hold a sparsity above 0, got {values}")
    return tuple(values)


def error_prior(count: int) -> torch.Tensor:
    """e(s_i) = (i / (L − 1))² for i = 0 .. L−1 (L = ``count`` >= 2), float64 [L] (CPU)."""
    check_int("count (levels)", count, "error_prior", minimum=2)
    return (torch.arange(count, dtype=torch.float64) / (count - 1)) ** 2
