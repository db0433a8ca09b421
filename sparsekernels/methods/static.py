"""Static sparse training: a fixed random mask (uniform or ERK), never updated."""

from __future__ import annotations

import torch
from torch import nn

from .base import SparseTrainingMethod


class Static(SparseTrainingMethod):
    """The baseline of dynamic sparse training: layers get a random mask at the given
    sparsity (ERK by default) when the method is constructed and keep it. ``total_steps``
    is recorded (every method takes it) and changes nothing: the mask has no schedule."""

    name = "static"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, sparsity: float = 0.9,
                 distribution: str = "erk", seed: int = 0, total_steps: int | None = None,
                 include=(nn.Linear, nn.Conv2d), exclude=()) -> None:
        super().__init__(model, optimizer, sparsity=sparsity, distribution=distribution, update_interval=1,
                         seed=seed, total_steps=total_steps, include=include, exclude=exclude)
