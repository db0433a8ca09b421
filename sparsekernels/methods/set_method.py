"""SET (Mocanu et al. 2018): drop by magnitude, regrow at random."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..topology import grow_random
from .base import SparseTrainingMethod, _check_fraction, warn_if_never_updated


class SET(SparseTrainingMethod):
    """Every ``update_interval`` steps until ``t_end``, each layer drops the
    ``drop_fraction`` (zeta) of its active weights with the smallest magnitude and grows
    as many inactive positions uniformly at random, from a generator seeded by
    (seed, step, layer), so all ranks and every rerun draw the same positions.

    SET updates the topology throughout training (Mocanu et al. 2018), so ``t_end``
    defaults to ``total_steps``, and with neither given the updates never stop."""

    name = "set"
    schedule_keys = SparseTrainingMethod.schedule_keys + ("drop_fraction", "t_end")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, sparsity: float = 0.9,
                 distribution: str = "erk", update_interval: int = 100, drop_fraction: float = 0.3,
                 t_end: int | None = None, total_steps: int | None = None, seed: int = 0,
                 include=(nn.Linear, nn.Conv2d), exclude=()) -> None:
        self.drop_fraction = _check_fraction("drop_fraction", drop_fraction)
        total_steps = check_int("total_steps", total_steps, allow_none=True)
        t_end = check_int("t_end", t_end, allow_none=True)
        self.t_end = total_steps if t_end is None else t_end
        warn_if_never_updated("SET", update_interval, self.t_end)
        super().__init__(model, optimizer, sparsity=sparsity, distribution=distribution,
                         update_interval=update_interval, seed=seed, total_steps=total_steps, include=include,
                         exclude=exclude)

    def is_update_step(self, step: int) -> bool:
        return step % self.update_interval == 0 and (self.t_end is None or step <= self.t_end)

    def plan(self, step: int) -> dict[str, tuple[int, int]]:
        return {name: (int(self.drop_fraction * layer.nnz),) * 2 for name, layer in self.layers.items()}

    def grow(self, name: str, layer, n: int, keep: Tensor, step: int, index: int):
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step * 1_009 + index) % (2**63))
        rows, cols = grow_random(layer, n, generator, keep)
        return rows, cols, None
