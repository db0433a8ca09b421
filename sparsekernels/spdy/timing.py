"""SPDY's timing database, measured with this package's kernels on the model's device.

For SPDY (Frantar & Alistarh, "SPDY: Accurate Pruning with Speedup Guarantees", ICML 2022)
the time of every prunable layer at every sparsity level is measured once; a plan's time
is then predicted as the sum of its layers' times plus the fixed rest of the model.

What is measured (:func:`measure_timings`):

* the prunable layers (``nn.Linear``, ``nn.Conv2d``, transformers ``Conv1D``: what
  :func:`sparsekernels.sparsify` converts) and the input each one receives, captured by
  forward pre-hooks over one calibration batch. Layers that are already sparse
  (``SparseLinear``, ``SparseConv2d``, ``BSRLinear``, ``Sparse24Linear``: a sparsified
  model) are not re-planned: they run as they are and count as part of the rest
  (``sparsekernels.densify`` the model first to plan them from their dense twins);
* the dense model, run whole (forward, ``torch.no_grad``) with hooks timing each prunable
  layer in place, ``max(repeats, 5)`` times before and as often after the sweep below: a
  layer's dense time is its median time inside the model, the rest of the model
  (activations, pooling, reshapes, already-sparse layers) the median of (model time − time
  inside the prunable layers). All of them come from the same forwards, so a slow moment
  of the machine cannot inflate one layer against the others;
* per layer and level s > 0: the layer SPDY's plan would produce, ``SparseLinear`` /
  ``SparseConv2d`` ``.from_dense(layer, sparsity=s)``, timed against the dense layer on the
  captured input, forward under ``torch.no_grad``, dense and sparse calls interleaved
  round by round (``bench.harness.time_round_robin``: a warm-up, which also runs the
  backend measurement of ``"auto"`` dispatch, then ``repeats`` rounds, each sample at
  least 2 ms). The level's sparse time is the median per-round ratio sparse / dense times
  the layer's dense time in the model. Levels are timed from the sparsest down; once the
  sparse layer is slower than ``stop_ratio`` x dense at two consecutive levels, the denser
  levels are not timed (kernel time falls with sparsity: they would be slower still) and
  stay dense;
* t_l(s) = min(dense, sparse): where the sparse kernel is slower, the plan keeps the
  layer dense (sparsity 0 in the plan).

A layer called more than once per forward (a shared module) is timed on its first input
and counted once per call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..bench.harness import machine_info, median_ratio, time_round_robin
from ..nn import sparse_class_for
from ..oneshot._progress import progress as progress_bar
from ..oneshot.calibration import batch_call

DEFAULT_REPEATS = 5
STOP_RATIO = 1.25


@dataclass
class LayerTiming:
    """Timings of one prunable layer, in seconds per model forward.

    ``dense_s``: the dense layer's time inside the model; ``sparse_s[i]``: the sparse
    layer's at level i (None at level 0, the dense layer, and at levels not timed), its
    time ratio to dense measured in isolation times ``dense_s``; ``isolated_dense_s``: the
    dense layer timed alone on its captured input (for comparison)."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    calls: int
    dense_s: float
    sparse_s: list[float | None]
    isolated_dense_s: float | None = None

    def sparse_faster(self, level: int) -> bool:
        """Whether the sparse layer at ``level`` beats the dense one (else the plan keeps it dense)."""
        t = self.sparse_s[level]
        return level > 0 and t is not None and t < self.dense_s

    def time(self, level: int) -> float:
        """t_l(s_level) = min(dense, sparse) seconds."""
        return self.sparse_s[level] if self.sparse_faster(level) else self.dense_s


@dataclass
class TimingDB:
    """The timing database of one model, input batch shape and device.

    ``levels`` the sparsity grid (levels[0] = 0), ``layers`` the prunable layers in call
    order, ``rest_s`` the non-prunable rest per forward, ``model_dense_s`` the measured
    forward time of the whole dense model, ``machine`` what it was measured on."""

    levels: tuple[float, ...]
    layers: dict[str, LayerTiming]
    rest_s: float
    model_dense_s: float
    machine: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.layers)

    def times(self) -> Tensor:
        """[layers, levels] t_l(s_i) seconds (float64, CPU)."""
        return torch.tensor([[lt.time(i) for i in range(len(self.levels))] for lt in self.layers.values()],
                            dtype=torch.float64)

    @property
    def dense_s(self) -> float:
        """Predicted dense forward: rest + Σ dense layer times."""
        return self.rest_s + sum(lt.dense_s for lt in self.layers.values())

    def planned_s(self, plan: Sequence[int]) -> float:
        """Predicted forward time with level ``plan[l]`` for layer l."""
        return self.rest_s + sum(lt.time(i) for lt, i in zip(self.layers.values(), plan))

    def fastest_plan(self) -> list[int]:
        return self.times().argmin(dim=1).tolist()

    def max_speedup(self) -> float:
        """Dense time over the time with every layer at its fastest level."""
        return self.dense_s / self.planned_s(self.fastest_plan())

    def sparsities(self, plan: Sequence[int]) -> dict[str, float]:
        """Layer name -> planned sparsity (0 where the layer stays dense)."""
        return {name: (self.levels[i] if lt.sparse_faster(i) else 0.0)
                for (name, lt), i in zip(self.layers.items(), plan)}

    def to_dict(self) -> dict:
        return {"levels": list(self.levels), "rest_s": self.rest_s, "model_dense_s": self.model_dense_s,
                "dense_s": self.dense_s, "machine": self.machine,
                "layers": [{"name": lt.name, "kind": lt.kind, "weight_shape": list(lt.weight_shape),
                            "input_shape": list(lt.input_shape), "calls": lt.calls, "dense_s": lt.dense_s,
                            "sparse_s": lt.sparse_s, "isolated_dense_s": lt.isolated_dense_s}
                           for lt in self.layers.values()]}

    @classmethod
    def from_dict(cls, data: dict) -> "TimingDB":
        layers = {d["name"]: LayerTiming(d["name"], d["kind"], tuple(d["weight_shape"]), tuple(d["input_shape"]),
                                         d["calls"], d["dense_s"], list(d["sparse_s"]), d.get("isolated_dense_s"))
                  for d in data["layers"]}
        return cls(tuple(data["levels"]), layers, data["rest_s"], data["model_dense_s"], data.get("machine", {}))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: dict[str, nn.Module], batch) -> dict[str, tuple[Tensor, int]]:
    """Runs ``batch`` through ``model`` once; returns, in call order, name -> (first input
    of the layer, calls per forward) for the ``layers`` the forward reaches."""
    seen: dict[str, list] = {}
    handles = []
    for name, module in layers.items():
        def hook(mod, args, kwargs, name=name):
            x = args[0] if args else next(iter(kwargs.values()))
            if name in seen:
                seen[name][1] += 1
            else:
                seen[name] = [x.detach().clone(), 1]
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        args, kwargs = batch_call(batch)
        model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {name: (x, calls) for name, (x, calls) in seen.items()}


@torch.no_grad()
def time_in_model(model: nn.Module, layers: dict[str, nn.Module], batch, rounds: int,
                  warmup: int = 1) -> tuple[list[float], dict[str, list[float]]]:
    """Forwards of ``batch`` through ``model`` with hooks timing the ``layers`` in place:
    (seconds per forward, name -> seconds spent inside that layer in each forward), one
    sample per round after ``warmup`` untimed forwards."""
    device = _device_of(model)
    spent: dict[str, float] = {}
    started: dict[str, float] = {}
    handles = []
    for name, module in layers.items():
        def pre(mod, args, name=name):
            _sync(device)
            started[name] = time.perf_counter()

        def post(mod, args, out, name=name):
            _sync(device)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - started[name]
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    args, kwargs = batch_call(batch)
    totals, inside = [], {name: [] for name in layers}
    try:
        for r in range(warmup + rounds):
            spent.clear()
            _sync(device)
            t0 = time.perf_counter()
            model(*args, **kwargs)
            _sync(device)
            if r >= warmup:
                totals.append(time.perf_counter() - t0)
                for name in layers:
                    inside[name].append(spent.get(name, 0.0))
    finally:
        for h in handles:
            h.remove()
    return totals, inside


@torch.no_grad()
def _time_levels(module: nn.Module, x: Tensor, levels: Sequence[float], todo: Sequence[int], repeats: int,
                 stop_ratio: float, device: torch.device, tick) -> tuple[float, list[float | None]]:
    """(dense seconds per call in isolation, sparse / dense time ratio at each level or None)
    of one layer on its input ``x``."""
    sparse_cls = sparse_class_for(module)
    dense_samples: list[float] = []
    ratios: list[float | None] = [None] * len(levels)
    slower = 0
    for i in todo:
        if slower < 2:
            sparse = sparse_cls.from_dense(module, sparsity=levels[i])
            samples = time_round_robin({"dense": lambda: module(x), "sparse": lambda: sparse(x)}, repeats,
                                       device=str(device))
            del sparse
            dense_samples += samples["dense"]
            ratios[i] = 1.0 / median_ratio(samples["dense"], samples["sparse"])
            slower = slower + 1 if ratios[i] > stop_ratio else 0
        tick()
    return statistics.median(dense_samples) if dense_samples else float("nan"), ratios


def measure_timings(model: nn.Module, batch, layers: dict[str, nn.Module], levels: Sequence[float], *,
                    repeats: int = DEFAULT_REPEATS, stop_ratio: float = STOP_RATIO,
                    progress: bool = True) -> TimingDB:
    """The :class:`TimingDB` of ``model`` on ``batch`` (one loader item) for its prunable
    ``layers`` (name -> module, e.g. :func:`sparsekernels.nn.eligible_layers`) at the
    sparsity grid ``levels`` (levels[0] = 0). The model runs in eval mode, under no_grad,
    on its own device, with the current torch thread count. See the module docstring."""
    device = _device_of(model)
    was = {m: m.training for m in model.modules()}
    model.eval()
    rounds = max(repeats, 5)
    try:
        inputs = capture_inputs(model, layers, batch)
        reached = {name: layers[name] for name in inputs}
        totals, inside = time_in_model(model, reached, batch, rounds)
        # Sparsest first: the cut-off can then skip the slow, dense-ish levels.
        todo = list(range(len(levels) - 1, 0, -1))
        bar = iter(progress_bar(range(len(reached) * len(todo)), "spdy: timing layers x levels", progress))

        def tick() -> None:
            next(bar, None)

        measured = {}
        for name, module in reached.items():
            measured[name] = _time_levels(module, inputs[name][0], levels, todo, repeats, stop_ratio, device, tick)
        for _ in bar:  # finish the progress bar
            pass
        # The in-model timing once more after the sweep: the dense times and the rest are the
        # medians of both, so a slow moment at the start does not fix them.
        more_totals, more_inside = time_in_model(model, reached, batch, rounds)
    finally:
        for m, flag in was.items():
            m.train(flag)
    for name in reached:
        inside[name] += more_inside[name]
    totals += more_totals
    rests = [t - sum(inside[n][k] for n in reached) for k, t in enumerate(totals)]
    timings: dict[str, LayerTiming] = {}
    for name, module in reached.items():
        x, calls = inputs[name]
        isolated, ratios = measured[name]
        dense = statistics.median(inside[name])
        timings[name] = LayerTiming(name, type(module).__name__, tuple(module.weight.shape), tuple(x.shape), calls,
                                    dense, [None if r is None else r * dense for r in ratios], isolated * calls)
    return TimingDB(tuple(levels), timings, max(0.0, statistics.median(rests)), statistics.median(totals),
                    machine_info(str(device)))


@torch.no_grad()
def measure_speedup(dense: nn.Module, other: nn.Module, batch, rounds: int = 7) -> dict:
    """End-to-end forward of ``dense`` vs ``other`` on ``batch``, interleaved round by
    round: ``{"speedup": median per-round dense / other, "dense_s", "other_s"}`` (medians)."""
    args, kwargs = batch_call(batch)
    device = _device_of(dense)
    samples = time_round_robin({"dense": lambda: dense(*args, **kwargs), "other": lambda: other(*args, **kwargs)},
                               rounds, device=str(device))
    return {"speedup": median_ratio(samples["dense"], samples["other"]),
            "dense_s": statistics.median(samples["dense"]), "other_s": statistics.median(samples["other"])}
