"""GMP (Zhu & Gupta 2017): gradual magnitude pruning from dense (or s_i) to s_f."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..formats import check_sparsity, kept_count, magnitude_mask
from ..nn import layer_sparsities
from .base import SparseTrainingMethod, weight_shape
from .schedules import gmp_sparsity


class GMP(SparseTrainingMethod):
    """Every ``update_interval`` steps between ``start_step`` and ``end_step``, each layer
    is pruned by magnitude to s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 (its own s_f
    under ERK). Layers start at ``initial_sparsity`` (default 0: all weights stored, still
    in CSR, so memory shrinks as the schedule advances). ``end_step`` defaults to 75% of
    ``total_steps`` (one of the two is required). nnz changes, so GMP does not combine
    with DDP's fixed gradient buckets."""

    name = "gmp"
    schedule_keys = SparseTrainingMethod.schedule_keys + ("initial_sparsity", "start_step", "end_step")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, sparsity: float = 0.9,
                 initial_sparsity: float = 0.0, start_step: int = 0, end_step: int | None = None,
                 total_steps: int | None = None, update_interval: int = 100, distribution: str = "uniform",
                 seed: int = 0, include=(nn.Linear, nn.Conv2d), exclude=()) -> None:
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > check_sparsity(sparsity):
            warnings.warn(f"GMP: initial_sparsity ({self.initial_sparsity}) is above sparsity ({sparsity}); GMP only "
                          "prunes, so every layer starts at its final target and the schedule has nothing to prune",
                          stacklevel=2)
        check_int("start_step", start_step, minimum=0)
        total_steps = check_int("total_steps", total_steps, allow_none=True)
        end_step = check_int("end_step", end_step, allow_none=True)
        if end_step is None:
            if total_steps is None:
                raise ValueError("GMP: give end_step or total_steps (end_step defaults to 75% of it)")
            end_step = max(start_step + 1, int(0.75 * total_steps))
        if end_step <= start_step:
            raise ValueError(f"GMP: end_step ({end_step}) must be after start_step ({start_step})")
        self.start_step, self.end_step = start_step, end_step
        super().__init__(model, optimizer, sparsity=sparsity, distribution=distribution,
                         update_interval=update_interval, seed=seed, total_steps=total_steps, include=include,
                         exclude=exclude)

    def _after_attach(self) -> None:
        shapes = {n: weight_shape(l) for n, l in self.layers.items()}
        self.final_sparsities = layer_sparsities(shapes, self.sparsity, self.distribution)

    def _check_schedule(self, schedule: dict) -> None:
        super()._check_schedule(schedule)
        start = schedule.get("start_step", self.start_step)
        check_int("start_step", start, minimum=0)
        end = schedule.get("end_step", self.end_step)
        if end <= start:
            raise ValueError(f"GMP: end_step ({end}) must be after start_step ({start})")

    def _after_load(self) -> None:
        self._after_attach()  # the per-layer targets follow the restored sparsity / distribution

    def initial_mask(self, name: str, weight: Tensor, sparsity: float, generator: torch.Generator) -> Tensor:
        # ``sparsity`` is the layer's final target: a layer that ERK keeps denser than
        # initial_sparsity starts at its target (GMP only prunes; starting above it, the
        # layer would stay there and the model end above its target).
        return magnitude_mask(weight, min(self.initial_sparsity, sparsity))

    def target_sparsity(self, name: str, step: int) -> float:
        final = self.final_sparsities[name]
        return gmp_sparsity(step, min(self.initial_sparsity, final), final, self.start_step, self.end_step)

    def is_update_step(self, step: int) -> bool:
        # Every update_interval steps from start_step, and at end_step itself so the final
        # sparsity is reached even when end_step is off that grid.
        on_grid = (step - self.start_step) % self.update_interval == 0
        return self.start_step <= step <= self.end_step and (on_grid or step == self.end_step)

    def plan(self, step: int) -> dict[str, tuple[int, int]]:
        out = {}
        for name, layer in self.layers.items():
            groups, rows, cols = layer.groups_layout
            keep = kept_count(groups * rows * cols, self.target_sparsity(name, step))
            out[name] = (max(0, layer.nnz - keep), 0)
        return out
