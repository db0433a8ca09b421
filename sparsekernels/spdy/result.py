"""The outcome of :func:`sparsekernels.spdy.search`: the plan, its predicted and measured
speed-up, and the way to apply it."""

from __future__ import annotations

import copy

from torch import nn

from .._checks import check_int
from ..oneshot import prune
from .timing import TimingDB, measure_speedup


def _shape(shape) -> str:
    return "x".join(str(v) for v in shape)


class SPDYResult:
    """A per-layer sparsity plan for a target speed-up.

    Attributes:
        plan: layer name -> sparsity (0: the layer stays dense), in call order.
        level_index: layer name -> index into ``timings.levels`` chosen by the search (a
            level whose sparse kernel is slower than dense is planned as 0).
        target_speedup, method: as given to ``search``.
        predicted_speedup: dense forward time / planned forward time, both from the timing
            database (rest + Σ per-layer times).
        predicted_time_s, dense_time_s, budget_s: seconds per forward (budget: the most
            the prunable layers may take, dense_time / target − rest).
        measured_speedup: end-to-end forward time of the dense model over that of the
            pruned model, measured interleaved in this process by :meth:`apply` (None
            before); ``measured`` holds both times.
        timings: the :class:`~.timing.TimingDB`.
        coefficients: layer name -> the sensitivity coefficient of the best candidate.
        score: its calibration loss; ``history``: every scored candidate.
        model: the model (pruned in place by :meth:`apply`); ``dense_model``: after
            :meth:`apply`, the dense copy it was measured against (``del`` it to free it).
    """

    def __init__(self, *, model: nn.Module, batches: list, timings: TimingDB, levels: list[int],
                 target_speedup: float, method: str, coefficients, score: float, history: list[dict],
                 budget_s: float, prune_options: dict) -> None:
        self.model, self._batches, self.timings = model, batches, timings
        self.level_index = dict(zip(timings.names, levels))
        self.plan = timings.sparsities(levels)
        self.target_speedup, self.method = float(target_speedup), method
        self.coefficients = {name: float(c) for name, c in zip(timings.names, coefficients)}
        self.score, self.history, self.budget_s = float(score), history, float(budget_s)
        self.dense_time_s = timings.dense_s
        self.predicted_time_s = timings.planned_s(levels)
        self.predicted_speedup = self.dense_time_s / self.predicted_time_s
        self.measured_speedup: float | None = None
        self.measured: dict | None = None
        self.dense_model: nn.Module | None = None
        self.applied = False
        self._prune_options = prune_options

    def apply(self, *, rounds: int = 9) -> nn.Module:
        """Prunes the model in place to the plan with one-shot ``method`` (sequential
        calibration, :func:`sparsekernels.oneshot.prune` with the per-layer sparsities),
        so planned layers become real ``SparseLinear`` / ``SparseConv2d`` layers and the
        rest stay as they are; then measures ``measured_speedup`` against a dense copy over
        ``rounds`` interleaved rounds. Returns the model (again on a second call)."""
        if self.applied:
            return self.model
        check_int("rounds", rounds, "SPDYResult.apply")  # before pruning, not after
        self.dense_model = copy.deepcopy(self.model)
        sparse = {name: s for name, s in self.plan.items() if s > 0}
        self.model = prune(self.model, self._batches, method=self.method, sparsity=sparse, inplace=True,
                           **self._prune_options)
        self.applied = True
        self.measure(rounds=rounds)
        return self.model

    def measure(self, *, rounds: int = 9) -> float:
        """(Re)measures ``measured_speedup``: the pruned model against the dense copy, end
        to end on the first calibration batch, in eval mode. Needs :meth:`apply` first."""
        if not self.applied or self.dense_model is None:
            raise RuntimeError("SPDYResult.measure: apply() the plan first (it keeps the dense copy to compare)")
        models = (self.dense_model, self.model)
        was = [{m: m.training for m in model.modules()} for model in models]
        for model in models:
            model.eval()
        try:
            self.measured = measure_speedup(self.dense_model, self.model, self._batches[0], rounds)
        finally:
            for flags in was:
                for m, flag in flags.items():
                    m.train(flag)
        self.measured_speedup = self.measured["speedup"]
        return self.measured_speedup

    def table(self) -> str:
        """The plan as a plain-text table: per layer its kind, weight and input shapes,
        planned sparsity, kernel, dense and planned milliseconds; then the rest, totals and
        the predicted (and measured) speed-up."""
        db = self.timings
        head = ("layer", "kind", "weight", "input", "sparsity", "kernel", "dense ms", "planned ms")
        rows = []
        for name, lt in db.layers.items():
            i = self.level_index[name]
            rows.append((name, lt.kind, _shape(lt.weight_shape), _shape(lt.input_shape), f"{self.plan[name]:.3f}",
                         "sparse" if lt.sparse_faster(i) else "dense", f"{lt.dense_s * 1e3:.3f}",
                         f"{lt.time(i) * 1e3:.3f}"))
        rows.append(("(rest)", "", "", "", "", "", f"{db.rest_s * 1e3:.3f}", f"{db.rest_s * 1e3:.3f}"))
        rows.append(("total", "", "", "", "", "", f"{self.dense_time_s * 1e3:.3f}", f"{self.predicted_time_s * 1e3:.3f}"))
        widths = [max(len(str(r[k])) for r in [head, *rows]) for k in range(len(head))]
        lines = ["  ".join(str(v).rjust(w) if k >= 4 else str(v).ljust(w) for k, (v, w) in enumerate(zip(r, widths)))
                 for r in [head, *rows]]
        machine = db.machine
        lines.insert(0, f"SPDY plan: target {self.target_speedup:.2f}x, method {self.method}, {len(db.levels)} levels "
                        f"(max {db.levels[-1]:.3f}), {machine.get('device', '?')} {machine.get('cpu', '')} "
                        f"({machine.get('threads', '?')} threads)")
        lines.append(f"predicted speed-up {self.predicted_speedup:.3f}x (budget for the prunable layers "
                     f"{self.budget_s * 1e3:.3f} ms)" + ("" if self.measured_speedup is None else
                                                         f", measured {self.measured_speedup:.3f}x"))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Everything as JSON-able data (the timing database included, with the machine)."""
        return {"target_speedup": self.target_speedup, "method": self.method, "plan": self.plan,
                "level_index": self.level_index, "predicted_speedup": self.predicted_speedup,
                "predicted_time_s": self.predicted_time_s, "dense_time_s": self.dense_time_s,
                "budget_s": self.budget_s, "measured_speedup": self.measured_speedup, "measured": self.measured,
                "coefficients": self.coefficients, "score": self.score, "history": self.history,
                "timings": self.timings.to_dict()}

    def __repr__(self) -> str:
        measured = "" if self.measured_speedup is None else f", measured {self.measured_speedup:.2f}x"
        return (f"SPDYResult(target {self.target_speedup:.2f}x, predicted {self.predicted_speedup:.2f}x{measured}, "
                f"plan={ {n: round(s, 3) for n, s in self.plan.items()} })")
