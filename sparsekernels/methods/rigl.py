"""RigL (Evci et al. 2020): drop by magnitude, grow by |gradient|, cosine drop fraction."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..topology import grow_by_gradient
from . import _distributed
from .base import SparseTrainingMethod, _check_fraction, warn_if_never_updated
from .schedules import cosine_drop_fraction


class RigL(SparseTrainingMethod):
    """Every ``update_interval`` steps until ``t_end``, each layer drops the
    ``f(t) * nnz`` active weights of smallest magnitude and grows as many inactive
    positions with the largest |dL/dW| of that step, computed by the fused ``topk_grow``
    kernel from the layer's input and output gradient (no dense gradient is formed).
    f(t) = drop_fraction / 2 * (1 + cos(pi t / t_end)); t_end defaults to 75% of
    ``total_steps`` (one of the two is required). Grown weights start at zero with zero
    optimizer state.

    Under torch.distributed the growth scores come from the inputs and output gradients
    of all ranks (all-gathered), so every rank picks the same positions.
    """

    name = "rigl"
    needs_gradient = True
    schedule_keys = SparseTrainingMethod.schedule_keys + ("drop_fraction", "t_end")
    _gathered: dict = {}

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, sparsity: float = 0.9,
                 distribution: str = "erk", update_interval: int = 100, drop_fraction: float = 0.3,
                 t_end: int | None = None, total_steps: int | None = None, seed: int = 0,
                 include=(nn.Linear, nn.Conv2d), exclude=()) -> None:
        self.drop_fraction = _check_fraction("drop_fraction", drop_fraction)
        total_steps = check_int("total_steps", total_steps, allow_none=True)
        t_end = check_int("t_end", t_end, allow_none=True)
        if t_end is None:
            if total_steps is None:
                raise ValueError("RigL: give total_steps (t_end defaults to 75% of it) or t_end")
            t_end = max(1, int(0.75 * total_steps))
        self.t_end, self.total_steps = t_end, total_steps
        warn_if_never_updated("RigL", update_interval, t_end)
        super().__init__(model, optimizer, sparsity=sparsity, distribution=distribution,
                         update_interval=update_interval, seed=seed, total_steps=total_steps, include=include,
                         exclude=exclude)

    def _check_schedule(self, schedule: dict) -> None:
        super()._check_schedule(schedule)
        if "t_end" in schedule:
            check_int("t_end", schedule["t_end"])  # RigL stops growing at t_end: it needs one

    def is_update_step(self, step: int) -> bool:
        return step % self.update_interval == 0 and step <= self.t_end

    def fraction(self, step: int) -> float:
        return cosine_drop_fraction(step, self.drop_fraction, self.t_end)

    def plan(self, step: int) -> dict[str, tuple[int, int]]:
        f = self.fraction(step)
        out = {}
        for name, layer in self.layers.items():
            n = int(f * layer.nnz)  # the dropped positions alone leave room for n
            out[name] = (n, n) if self._gathered.get(name) is not None else (0, 0)
        return out

    def grow(self, name: str, layer, n: int, keep: Tensor, step: int, index: int):
        x, dy = self._gathered[name]
        rows, cols, scores = grow_by_gradient(layer, x, dy, n, keep)
        return rows, cols, scores

    def update(self, step: int) -> dict:
        # Gather every layer's input / output gradient first (same order on every rank; a
        # rank where a layer had no forward contributes zero rows), so a layer unused in
        # this step is skipped as a whole before any layer changes.
        self._gathered = {}
        for name, layer in self.layers.items():
            captured = layer.captured()
            if captured is None:
                rows, cols = layer.csr().shape
                captured = (layer.values.new_zeros(0, cols), layer.values.new_zeros(0, rows))
            x, dy = (_distributed.all_gather_rows(t) for t in captured)
            self._gathered[name] = (x, dy) if x.shape[0] else None
        # Checked for every layer before any layer changes: a non-finite activation or
        # gradient in a later layer must not leave earlier layers already updated.
        for name, pair in self._gathered.items():
            for what, t in zip(("input", "output gradient"), pair or ()):
                if t.numel() and not bool(torch.isfinite(t).all()):
                    for layer in self.layers.values():
                        layer.capture_next(False)
                    self._gathered = {}
                    raise ValueError(f"RigL step {step}: layer '{name}' has a non-finite {what} (NaN or inf) in the "
                                     "update step; growth by gradient is undefined there and no layer was changed "
                                     "(skip the step or fix the loss scaling)")
        try:
            record = super().update(step)
        finally:
            for layer in self.layers.values():
                layer.capture_next(False)  # free the captured activations
            skipped = [n for n, g in self._gathered.items() if g is None]
            self._gathered = {}
        for name in skipped:
            record["layers"][name]["skipped"] = "no forward / backward through this layer in the update step"
        if skipped:
            warnings.warn(f"RigL step {step}: layers {skipped} had no forward / backward in the update step; "
                          "their masks were left unchanged", stacklevel=2)
        return record
