"""``spdy.search``: a per-layer sparsity profile that meets a target end-to-end speed-up
on this machine, with our kernels, at the least calibration loss SPDY finds."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from torch import Tensor, nn

from .._checks import check_int, check_positive_number
from ..nn import eligible_layers
from ..nn.sparsify import DEFAULT_INCLUDE
from ..oneshot.calibration import materialise
from ..oneshot.sparsegpt import BLOCK_SIZE
from .coefficients import MUTATE_FRACTION, PATIENCE, SEARCH_STEPS, coefficient_search
from .database import DEFAULT_CACHE_BYTES, METHODS, PrunedWeights
from .dp import DEFAULT_BUCKETS, solve
from .levels import DEFAULT_LEVELS, check_levels, error_prior
from .result import SPDYResult
from .scoring import CalibrationLoss
from .timing import DEFAULT_REPEATS, TimingDB, measure_timings



def _check_target(target_speedup: object) -> float:
    if isinstance(target_speedup, bool) or not isinstance(target_speedup, (int, float)):
        raise TypeError(f"spdy.search: target_speedup must be a number > 1, got {type(target_speedup).__name__}")
    if not math.isfinite(float(target_speedup)) or target_speedup <= 1:
        raise ValueError(f"spdy.search: target_speedup must be a finite number > 1 (the dense model is 1x), got "
                         f"{target_speedup!r}")
    return float(target_speedup)


def _check_timings(timings: object, layers: dict[str, nn.Module]) -> TimingDB:
    if not isinstance(timings, TimingDB):
        raise TypeError(f"spdy.search: timings must be a TimingDB (e.g. an earlier result's .timings), got "
                        f"{type(timings).__name__}")
    unknown = [n for n in timings.names if n not in layers]
    if unknown:
        raise ValueError(f"spdy.search: timings name layers that are not prunable layers of this model: {unknown}")
    return timings


def search(model: nn.Module, loader: Iterable, *, target_speedup: float, levels: int | Iterable[float] = DEFAULT_LEVELS,
           method: str = "sparsegpt", search_steps: int = SEARCH_STEPS, seed: int = 0, apply: bool = False,
           loss_fn: Callable | None = None, random_candidates: int | None = None,
           mutate_fraction: float = MUTATE_FRACTION, patience: int = PATIENCE, buckets: int = DEFAULT_BUCKETS,
           repeats: int = DEFAULT_REPEATS, timings: TimingDB | None = None, damp: float = 0.01,
           block_size: int = BLOCK_SIZE, cache_bytes: int = DEFAULT_CACHE_BYTES, include=DEFAULT_INCLUDE,
           exclude=(), progress: bool = True) -> SPDYResult:
    """SPDY: the per-layer sparsities that reach ``target_speedup`` over the dense model,
    end to end, with the least calibration loss found.

    Frantar & Alistarh, "SPDY: Accurate Pruning with Speedup Guarantees", ICML 2022. Steps:

    1. timing database (:mod:`.timing`): every prunable layer (``nn.Linear`` /
       ``nn.Conv2d`` / transformers ``Conv1D``; already-sparse layers count as the fixed
       rest) timed dense and as our ``SparseLinear`` / ``SparseConv2d`` at every level,
       on its real input (first calibration batch), on the model's device with the current
       thread count; t_l(s) = min(dense, sparse);
    2. budget for the prunable layers: dense time / target − the rest's time;
    3. dynamic program (:mod:`.dp`): minimise Σ c_l · e(s) with the prior e(s_i) =
       (i / (L − 1))² under Σ t_l(s) <= budget, time in ``buckets`` steps;
    4. search over the coefficients c (:mod:`.coefficients`): ``search_steps`` candidates,
       each plan scored by the calibration loss with every layer pruned to its level by
       ``method`` (:mod:`.database`: each layer alone, on the dense model's inputs) and
       stitched into the model (:mod:`.scoring`).

    Args:
        model: the trained dense model (float weights; any device). Not changed unless
            ``apply``.
        loader: calibration batches (input tensors, ``(inputs, targets, ...)`` tuples or
            dicts of keyword inputs), read once; the first sets the timed input shapes.
        target_speedup: > 1, end-to-end forward speed-up over the dense model.
        levels: number of sparsity levels L (default 40: 0 to 0.99, geometric in the
            density, see :mod:`.levels`) or the sparsities themselves (increasing, in
            [0, 1); 0 is added in front).
        method: ``"sparsegpt"`` or ``"magnitude"``, for the search's scoring and for
            :meth:`SPDYResult.apply`.
        search_steps: candidates scored (default 30; the paper uses thousands on a GPU).
        seed: the search's random generator.
        apply: prune the model to the plan at once (:meth:`SPDYResult.apply`), which also
            measures the real speed-up.
        loss_fn: ``loss_fn(output, target)`` on ``(inputs, targets)`` batches instead of the
            default MSE between the pruned and the dense model's outputs.
        random_candidates, mutate_fraction, patience: the search's phases (see
            :func:`.coefficients.coefficient_search`).
        buckets: time steps of the dynamic program (default 10⁴, as the paper).
        repeats: timed rounds per measurement (medians).
        timings: a :class:`TimingDB` measured before for this model and batch shape (e.g.
            an earlier result's ``.timings``): skips the timing and fixes the levels.
        damp, block_size: SparseGPT's dampening and block size.
        cache_bytes: memory for the pruned weights the search keeps.
        include, exclude: which layers are prunable, as for :func:`sparsekernels.sparsify`.
        progress: progress bars (tqdm) for the timing, the search and the pruning.
    Returns: an :class:`SPDYResult` (``.plan``, ``.predicted_speedup``,
        ``.measured_speedup`` after ``.apply()``, ``.table()``, ``.timings``).
    Raises: TypeError / ValueError naming the argument: a loader with no batches,
        target_speedup <= 1 or beyond what the sparsest levels give (the message says the
        most this model reaches), invalid levels, a model without prunable layers, an
        unknown method.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"spdy.search: model must be an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"spdy.search: method must be one of {METHODS}, got {method!r}")
    target = _check_target(target_speedup)
    grid = check_levels(levels, "spdy.search") if timings is None else tuple(getattr(timings, "levels", ()))
    check_int("search_steps", search_steps, "spdy.search")
    check_int("buckets", buckets, "spdy.search")
    check_int("repeats", repeats, "spdy.search")
    check_int("patience", patience, "spdy.search")
    if random_candidates is not None:
        check_int("random_candidates", random_candidates, "spdy.search", minimum=0)
    if isinstance(mutate_fraction, bool) or not isinstance(mutate_fraction, (int, float)) or not 0 <= mutate_fraction <= 1:
        raise ValueError(f"spdy.search: mutate_fraction must be in [0, 1], got {mutate_fraction!r}")
    # Checked here, not where they are first used after the timing pass (minutes later).
    check_positive_number("damp", damp, "spdy.search")
    check_int("block_size", block_size, "spdy.search")
    check_int("cache_bytes", cache_bytes, "spdy.search", minimum=0)
    check_int("seed", seed, "spdy.search", minimum=None)
    batches = materialise(loader, "spdy.search")
    layers = eligible_layers(model, include, exclude)
    if not layers:
        raise ValueError("spdy.search: model has no prunable layers (nn.Linear / nn.Conv2d / transformers Conv1D that "
                         "sparsify would convert; layers already sparse are not re-planned: densify the model to "
                         "plan them)")
    if "" in layers:
        raise ValueError(f"spdy.search: model is itself a single {type(model).__name__} layer; wrap it in an "
                         "nn.Sequential so its layer can be swapped")
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        db = (measure_timings(model, batches[0], layers, grid, repeats=repeats, progress=progress)
              if timings is None else _check_timings(timings, layers))
        if not db.layers:
            raise ValueError("spdy.search: the model's forward never called its prunable layers on the first batch")
        best_speedup = db.max_speedup()
        if target > best_speedup:
            raise ValueError(f"spdy.search: target_speedup={target:g} is beyond what this model reaches with "
                             f"sparsekernels on {db.machine.get('device', 'this device')}: at most "
                             f"{best_speedup:.3f}x (every layer at its fastest level, sparsity up to {db.levels[-1]:g})")
        budget = db.dense_s / target - db.rest_s
        times = db.times()
        prior = error_prior(len(db.levels))
        names = db.names

        def plan_for(coefs: Tensor) -> tuple[int, ...]:
            solved = solve(coefs[:, None] * prior[None, :], times, budget, buckets)
            if solved is None:
                raise ValueError(f"spdy.search: target_speedup={target:g} is within the time rounding of the most "
                                 f"this model reaches ({best_speedup:.3f}x); use a slightly lower target or more "
                                 "buckets")
            return tuple(solved[0])

        pruned = PrunedWeights(model, {n: layers[n] for n in names}, batches, method, damp=damp,
                               block_size=block_size, cache_bytes=cache_bytes)
        loss = CalibrationLoss(model, {n: layers[n] for n in names}, batches, loss_fn)
        scores: dict[tuple[int, ...], float] = {}

        def score(coefs: Tensor) -> float:
            plan = plan_for(coefs)
            if plan not in scores:
                weights = {n: pruned.weight(n, db.levels[i]) for n, i in zip(names, plan)
                           if db.layers[n].sparse_faster(i)}
                scores[plan] = loss(weights)
            return scores[plan]

        coefs, best, history = coefficient_search(len(names), score, steps=search_steps,
                                                  random_candidates=random_candidates, mutate_fraction=mutate_fraction,
                                                  patience=patience, seed=seed, progress=progress)
    finally:
        for m, flag in was.items():
            m.train(flag)
    result = SPDYResult(model=model, batches=batches, timings=db, levels=list(plan_for(coefs)), target_speedup=target,
                        method=method, coefficients=coefs, score=best, history=history, budget_s=budget,
                        prune_options={"damp": damp, "block_size": block_size, "include": include,
                                       "exclude": exclude, "progress": progress})
    if apply:
        result.apply()
    return result
