"""SPDY's timing database, measured with this package's kernels on the model's device.

For SPDY (Frantar & Alistarh, "SPDY: Accurate Pruning with Speedup Guarantees", ICML 2022)
the time of every prunable layer at every sparsity level is measured once; a plan's time
is then predicted as the sum of its layers' times plus the fixed rest of the model.

What is measured (:func:`measure_timings`), all inside the model, forward under
``torch.no_grad`` on one calibration batch, with forward hooks timing each prunable layer
in place, so every layer runs at its real input shape with the caches as the model's other
layers leave them (a 1024-wide sparse layer timed alone in a loop, weights and input kept
in the cache, measured up to ~15% faster than inside the model; right after a forward of
the other model, whose weights then fill the cache, up to ~30% slower at 99%):

* the prunable layers: ``nn.Linear``, ``nn.Conv2d``, transformers ``Conv1D`` (what
  :func:`sparsekernels.sparsify` converts) that the forward reaches. Layers that are
  already sparse (``SparseLinear``, ``SparseConv2d``, ``BSRLinear``, ``Sparse24Linear``: a
  sparsified model) are not re-planned: they run as they are and count as the rest
  (``sparsekernels.densify`` the model first to plan them from their dense twins);
* per level s > 0, from the sparsest down: every layer still timed is swapped for the layer
  SPDY's plan would produce, ``SparseLinear`` / ``SparseConv2d``
  ``.from_dense(layer, sparsity=s)``; after a warm-up forward (which also runs the backend
  measurement of ``"auto"`` dispatch) the sparse and the dense model run ``repeats``
  rounds, alternating which goes first, each timed forward right after an untimed forward
  of the same model (as a model served forward after forward runs). A layer's sparse time
  at s is its median per-round ratio sparse / dense times its dense time, so a slow moment
  of the machine scales both;
* a layer's dense time and the rest of the model (activations, pooling, reshapes, layers
  already sparse) are the medians over all timed dense forwards of the time inside the
  layer and of (model time − time inside the prunable layers);
* once a layer is slower than ``stop_ratio`` x dense at two consecutive levels, its denser
  levels are not timed (kernel time falls with sparsity: they would be slower still) and
  it stays dense in the following rounds;
* t_l(s) = min(dense, sparse): where the sparse kernel is slower, the plan keeps the
  layer dense (sparsity 0 in the plan).

A layer called more than once per forward (a shared module) is timed over all its calls.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..bench.harness import machine_info, median_ratio
from ..nn import sparse_class_for
from ..nn._module_swap import swap_module
from ..oneshot._progress import progress as progress_bar
from ..oneshot.calibration import batch_call, forward_with_pre_hooks

DEFAULT_REPEATS = 5


STOP_RATIO = 1.25


@dataclass
class LayerTiming:
    """Timings of one prunable layer, in seconds per model forward (inside the model).

    ``dense_s``: the dense layer; ``sparse_s[i]``: the sparse layer at level i (None at
    level 0, the dense layer, and at levels not timed); ``input_shape``: its input on the
    timed batch; ``calls``: calls per forward."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    calls: int
    dense_s: float
    sparse_s: list[float | None]

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

    def __post_init__(self) -> None:
        short = [lt.name for lt in self.layers.values() if len(lt.sparse_s) != len(self.levels)]
        if short:
            raise ValueError(f"TimingDB: every layer needs one sparse time per level ({len(self.levels)}); "
                             f"{short} do not")

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
        if len(plan) != len(self.layers):
            raise ValueError(f"TimingDB.planned_s: the plan has {len(plan)} levels for {len(self.layers)} layers")
        return self.rest_s + sum(lt.time(i) for lt, i in zip(self.layers.values(), plan))

    def fastest_plan(self) -> list[int]:
        return self.times().argmin(dim=1).tolist()

    def max_speedup(self) -> float:
        """Dense time over the time with every layer at its fastest level."""
        if not self.layers:
            raise ValueError("TimingDB.max_speedup: the database holds no layer timings")
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
                            "sparse_s": lt.sparse_s} for lt in self.layers.values()]}

    @classmethod
    def from_dict(cls, data: dict) -> "TimingDB":
        layers = {d["name"]: LayerTiming(d["name"], d["kind"], tuple(d["weight_shape"]), tuple(d["input_shape"]),
                                         d["calls"], d["dense_s"], list(d["sparse_s"]))
                  for d in data["layers"]}
        return cls(tuple(data["levels"]), layers, data["rest_s"], data["model_dense_s"], data.get("machine", {}))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def capture_inputs(model: nn.Module, layers: dict[str, nn.Module], batch) -> dict[str, tuple[tuple[int, ...], int]]:
    """Runs ``batch`` through ``model`` once; returns, in call order, name -> (shape of the
    layer's first input, calls per forward) for the ``layers`` the forward reaches."""
    seen: dict[str, list] = {}

    def hook_for(name: str):
        def hook(mod, args, kwargs):
            if name in seen:
                seen[name][1] += 1
            else:
                x = args[0] if args else next(iter(kwargs.values()))
                seen[name] = [tuple(x.shape), 1]
        return hook

    forward_with_pre_hooks(model, layers, batch, hook_for)
    return {name: (shape, calls) for name, (shape, calls) in seen.items()}


class LayerClock:
    """Forward hooks that time named layers inside a model: :meth:`forward` runs one
    forward and returns (seconds, name -> seconds spent inside that layer). Every module
    given for a name (e.g. a dense layer and its sparse twin swapped in its place) counts
    for that name. :meth:`close` removes the hooks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._spent: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._handles: dict[int, list] = {}

    def watch(self, name: str, module: nn.Module) -> None:
        def pre(mod, args):
            _sync(self.device)
            self._started[name] = time.perf_counter()

        def post(mod, args, out):
            _sync(self.device)
            self._spent[name] = self._spent.get(name, 0.0) + time.perf_counter() - self._started[name]

        self._handles[id(module)] = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def unwatch(self, modules: Iterable[nn.Module]) -> None:
        for module in modules:
            for h in self._handles.pop(id(module), []):
                h.remove()

    def close(self) -> None:
        for handles in self._handles.values():
            for h in handles:
                h.remove()
        self._handles.clear()

    @torch.no_grad()
    def forward(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[float, dict[str, float]]:
        self._spent = {}
        _sync(self.device)
        t0 = time.perf_counter()
        model(*args, **kwargs)
        _sync(self.device)
        return time.perf_counter() - t0, self._spent


def _swap(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Puts ``layers`` (name -> module, names of submodules of ``model``) into ``model``."""
    for name, module in layers.items():
        swap_module(model, name, module)


class _Sweep:
    """The per-level rounds of :func:`measure_timings` (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], batch, repeats: int, stop_ratio: float):
        self.model, self.layers, self.repeats, self.stop_ratio = model, layers, repeats, stop_ratio
        self.args, self.kwargs = batch_call(batch)
        self.clock = LayerClock(_device_of(model))
        for name, module in layers.items():
            self.clock.watch(name, module)
        self.totals: list[float] = []
        self.dense: dict[str, list[float]] = {name: [] for name in layers}
        self.ratios: dict[str, dict[int, float]] = {name: {} for name in layers}
        self.active = list(layers)
        self._slower = {name: 0 for name in layers}

    def dense_forward(self) -> dict[str, float]:
        total, spent = self.clock.forward(self.model, self.args, self.kwargs)
        self.totals.append(total)
        for name in self.layers:
            self.dense[name].append(spent.get(name, 0.0))
        return spent

    def level(self, index: int, sparsity: float) -> None:
        sparse = {name: sparse_class_for(self.layers[name]).from_dense(self.layers[name], sparsity=sparsity)
                  for name in self.active}
        for name, module in sparse.items():
            self.clock.watch(name, module)
        dense = {name: self.layers[name] for name in sparse}
        ratios: dict[str, list[float]] = {name: [] for name in sparse}
        try:
            _swap(self.model, sparse)
            self.clock.forward(self.model, self.args, self.kwargs)  # warm-up; "auto" dispatch measures here
            for r in range(self.repeats):
                spent = {}
                for kind in (("sparse", "dense") if r % 2 else ("dense", "sparse")):
                    _swap(self.model, sparse if kind == "sparse" else dense)
                    # An untimed forward first: a model served forward after forward finds its
                    # own weights in the cache, not the other model's.
                    self.clock.forward(self.model, self.args, self.kwargs)
                    spent[kind] = (self.clock.forward(self.model, self.args, self.kwargs)[1] if kind == "sparse"
                                   else self.dense_forward())
                for name in sparse:
                    ratios[name].append(spent["sparse"][name] / max(spent["dense"][name], 1e-12))
        finally:
            _swap(self.model, dense)
            self.clock.unwatch(sparse.values())
        for name in sparse:
            ratio = statistics.median(ratios[name])
            self.ratios[name][index] = ratio
            self._slower[name] = self._slower[name] + 1 if ratio > self.stop_ratio else 0
        self.active = [name for name in self.active if self._slower[name] < 2]


def measure_timings(model: nn.Module, batch, layers: dict[str, nn.Module], levels: Sequence[float], *,
                    repeats: int = DEFAULT_REPEATS, stop_ratio: float = STOP_RATIO,
                    progress: bool = True) -> TimingDB:
    """The :class:`TimingDB` of ``model`` on ``batch`` (one loader item) for its prunable
    ``layers`` (name -> module, e.g. :func:`sparsekernels.nn.eligible_layers`) at the
    sparsity grid ``levels`` (levels[0] = 0). The model runs in eval mode, under no_grad,
    on its own device, with the current torch thread count; its layers are swapped for
    sparse ones during the measurement and always put back. See the module docstring."""
    check_int("repeats", repeats, "measure_timings")
    if (isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or len(levels) < 2
            or levels[0] != 0):
        raise ValueError(f"measure_timings: levels must be a sequence of sparsities starting at 0 (the dense "
                         f"level), e.g. spdy.levels.default_levels(); got {levels!r}")
    not_layers = [n for n, m in layers.items() if sparse_class_for(m) is None]
    if not_layers:
        raise ValueError(f"measure_timings: layers must be prunable layers (nn.Linear / nn.Conv2d / Conv1D), got "
                         f"{not_layers}")
    device = _device_of(model)
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        inputs = capture_inputs(model, layers, batch)
        reached = {name: layers[name] for name in inputs}
        sweep = _Sweep(model, reached, batch, repeats, stop_ratio)
        try:
            sweep.clock.forward(model, sweep.args, sweep.kwargs)  # warm-up
            # Sparsest first: the cut-off can then skip the slow, dense-ish levels.
            for i in progress_bar(range(len(levels) - 1, 0, -1), "spdy: timing levels", progress):
                if sweep.active:
                    sweep.level(i, levels[i])
            while len(sweep.totals) < max(repeats, 5):  # enough dense samples when few levels ran
                sweep.dense_forward()
        finally:
            sweep.clock.close()
    finally:
        for m, flag in was.items():
            m.train(flag)
    timings: dict[str, LayerTiming] = {}
    for name, module in reached.items():
        dense = statistics.median(sweep.dense[name])
        sparse = [sweep.ratios[name][i] * dense if i in sweep.ratios[name] else None for i in range(len(levels))]
        shape, calls = inputs[name]
        timings[name] = LayerTiming(name, type(module).__name__, tuple(module.weight.shape), shape, calls, dense, sparse)
    rests = [t - sum(sweep.dense[n][k] for n in reached) for k, t in enumerate(sweep.totals)]
    return TimingDB(tuple(levels), timings, max(0.0, statistics.median(rests)), statistics.median(sweep.totals),
                    machine_info(str(device)))


@torch.no_grad()
def measure_speedup(dense: nn.Module, other: nn.Module, batch, rounds: int = 9, inner: int = 1) -> dict:
    """End-to-end forward of ``dense`` vs ``other`` on ``batch``: ``rounds`` rounds, each
    timing both models (the order alternating) as the median of ``inner`` forwards after
    one untimed forward of the same model (so each finds its own weights in the cache).
    Returns ``{"speedup": median per-round dense / other, "dense_s", "other_s"}`` (medians)."""
    check_int("rounds", rounds, "measure_speedup")
    check_int("inner", inner, "measure_speedup")
    args, kwargs = batch_call(batch)
    device = _device_of(dense)
    models = {"dense": dense, "other": other}
    samples: dict[str, list[float]] = {"dense": [], "other": []}
    for r in range(rounds):
        for kind in (("other", "dense") if r % 2 else ("dense", "other")):
            models[kind](*args, **kwargs)
            times = []
            for _ in range(inner):
                _sync(device)
                t0 = time.perf_counter()
                models[kind](*args, **kwargs)
                _sync(device)
                times.append(time.perf_counter() - t0)
            samples[kind].append(statistics.median(times))
    return {"speedup": median_ratio(samples["dense"], samples["other"]),
            "dense_s": statistics.median(samples["dense"]), "other_s": statistics.median(samples["other"])}
