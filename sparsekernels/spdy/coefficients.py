"""SPDY's search over the per-layer sensitivity coefficients.

Frantar & Alistarh, "SPDY: Accurate Pruning with Speedup Guarantees", ICML 2022 (Section
3.2). Each candidate is a coefficient vector c ∈ [0, 1]^layers; the dynamic program turns
it into a plan, and the plan is scored by the calibration loss after one-shot pruning.
The search:

1. the uniform prior c = (1, ..., 1) (the plain dynamic program), then
   ``random_candidates`` vectors drawn uniformly from [0, 1]^layers; the best is kept;
2. local search: r = max(1, round(``mutate_fraction`` · layers)) coefficients of the
   best vector are redrawn; a candidate that scores better replaces it; after
   ``patience`` failures in a row r drops by one, down to 1;

stopping after ``steps`` scored candidates in all. The paper's run uses 100 random
candidates, patience 100 and 10% of the layers redrawn (thousands of candidates on a GPU);
the defaults here (``steps`` = 30, a third of them random) suit a CPU, where each
candidate costs a calibration forward pass and, on first use of a (layer, level), a
layer pruning. Scores are compared with "<", so the best score never gets worse.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import check_int
from ..oneshot._progress import progress as progress_bar

SEARCH_STEPS = 30
MUTATE_FRACTION = 0.1
PATIENCE = 100


def coefficient_search(layers: int, score: Callable[[Tensor], float], *, steps: int = SEARCH_STEPS,
                       random_candidates: int | None = None, mutate_fraction: float = MUTATE_FRACTION,
                       patience: int = PATIENCE, seed: int = 0,
                       progress: bool = False) -> tuple[Tensor, float, list[dict]]:
    """Minimises ``score(c)`` over coefficient vectors c [layers] (float64 CPU tensors in
    [0, 1]; ``score`` must not change them).

    ``random_candidates`` defaults to (steps − 1) // 3. Deterministic for a given ``seed``
    (a ``torch.Generator`` of its own; the global RNG is not touched). Returns (best c, its score, history): one dict per scored
    candidate with ``step``, ``phase`` ("uniform" / "random" / "local"), ``score`` and
    ``best`` (the best score so far, never increasing)."""
    for name, value, minimum in (("layers", layers, 1), ("steps", steps, 1), ("patience", patience, 1)):
        check_int(name, value, "coefficient_search", minimum=minimum)
    if not callable(score):
        raise TypeError(f"coefficient_search: score must be callable score(c) -> float, got {type(score).__name__}")
    rng = torch.Generator().manual_seed(seed)
    n_random = (steps - 1) // 3 if random_candidates is None else random_candidates
    history: list[dict] = []
    bar = iter(progress_bar(range(steps), "spdy: search", progress))
    best_c = torch.ones(layers, dtype=torch.float64)
    best = float("inf")

    def uniform(n: int) -> Tensor:
        return torch.rand(n, generator=rng, dtype=torch.float64)

    def evaluate(c: Tensor, phase: str) -> bool:
        nonlocal best, best_c
        s = float(score(c))
        better = s < best
        if better:
            best, best_c = s, c
        history.append({"step": len(history), "phase": phase, "score": s, "best": best})
        next(bar, None)
        return better

    evaluate(best_c, "uniform")
    for _ in range(min(n_random, steps - len(history))):
        evaluate(uniform(layers), "random")
    r = max(1, round(mutate_fraction * layers))
    while r >= 1 and len(history) < steps:
        fails = 0
        while fails < patience and len(history) < steps:
            c = best_c.clone()
            c[torch.randint(0, layers, (r,), generator=rng)] = uniform(r)
            fails = 0 if evaluate(c, "local") else fails + 1
        r -= 1
    for _ in bar:  # finish the progress bar when the search ends early
        pass
    if not math.isfinite(best):
        # A non-finite score never ranks better, so a search where no candidate scored a
        # finite value would hand back its first plan with score inf and no word of why.
        raise ValueError(f"spdy: no candidate plan had a finite calibration loss ({len(history)} scored; the model's "
                         "outputs or loss_fn are not finite on the calibration batches)")
    return best_c, best, history
