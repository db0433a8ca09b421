"""SR-STE (Zhou et al. 2021): 2:4 training from dense master weights."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..nn import Sparse24Linear, eligible_layers


class SRSTE:
    """Swaps the model's ``nn.Linear`` layers (in_features divisible by 4) for
    ``Sparse24Linear(mode="srste")`` sharing the SAME weight Parameter, so the optimizer
    and its state need no change. Each training forward (every ``update_every``) re-prunes
    the weight to 2:4 by magnitude, runs the compressed forward, and back-propagates
    dW = dy^T x + lambda_w (1 - E) W. ``remove()`` freezes the masks.
    """

    name = "srste"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, srste_lambda: float = 2e-4,
                 update_every: int = 1, transposable: bool = False, exclude=()) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"SRSTE: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"SRSTE: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.model, self.optimizer = model, optimizer
        self.layers: dict[str, Sparse24Linear] = {}
        skipped = []
        for name, module in eligible_layers(model, (nn.Linear,), exclude).items():
            if module.in_features % 4 or (transposable and module.out_features % 4):
                skipped.append(name)
                continue
            if id(module.weight) not in held:
                raise ValueError(f"SRSTE: the optimizer does not hold the weight of layer '{name}'")
            layer = Sparse24Linear.from_dense(module, mode="srste", srste_lambda=srste_lambda,
                                              update_every=update_every, transposable=transposable)
            layer.weight = module.weight  # the same Parameter: optimizer state stays valid
            layer.bias = module.bias
            parent, _, child = name.rpartition(".")
            if not child:
                raise ValueError("SRSTE: the model itself is a single layer; wrap it in a module")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            self.layers[name] = layer
        if not self.layers:
            raise ValueError("SRSTE: no nn.Linear layer with in_features divisible by 4")
        if skipped:
            warnings.warn("SRSTE: left dense (in_features not divisible by 4): " + ", ".join(skipped), stacklevel=2)

    def masks(self) -> dict[str, Tensor]:
        return {n: layer.mask() for n, layer in self.layers.items()}

    def remove(self) -> None:
        for layer in self.layers.values():
            layer.freeze_mask = True

    def state_dict(self) -> dict:
        return {"method": self.name, "forwards": {n: layer._forwards for n, layer in self.layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.name:
            raise ValueError(f"SRSTE.load_state_dict: state is for method {state.get('method')!r}")
        for n, count in state["forwards"].items():
            self.layers[n]._forwards = int(count)
