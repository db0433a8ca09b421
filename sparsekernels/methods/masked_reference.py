"""Masked-dense RigL: the textbook formulation (dense weight x 0/1 mask, dense gradient)
written independently of the sparse kernels and the topology module. It is the ground
truth the sparse RigL is tested against, and the "masked dense" row of the demo.

Inactive weights are held at exactly zero, their gradients are zeroed before the
optimizer step (so momentum / Adam moments there stay zero), and the growth score is the
dense gradient of the update step, exactly as RigL's reference code does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class MaskedDenseRigL:
    """RigL on dense ``nn.Linear`` / ``nn.Conv2d`` layers with explicit masks.

    Args:
        model: the dense model; ``masks`` maps module names to bool masks of the weight shape.
        optimizer: built on ``model.parameters()``.
        update_interval, drop_fraction, t_end: as :class:`sparsekernels.methods.RigL`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, masks: dict[str, Tensor], *,
                 update_interval: int = 100, drop_fraction: float = 0.3, t_end: int) -> None:
        self.model, self.optimizer = model, optimizer
        self.layers = {name: model.get_submodule(name) for name in masks}
        self.masks = {name: m.clone().bool() for name, m in masks.items()}
        self.update_interval, self.drop_fraction, self.t_end = update_interval, drop_fraction, t_end
        self.step = 0
        self._grads: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.weight.mul_(self.masks[name])
        self._pre = optimizer.register_step_pre_hook(self._before_step)
        self._post = optimizer.register_step_post_hook(self._after_step)

    def _is_update(self, step: int) -> bool:
        return step % self.update_interval == 0 and step <= self.t_end

    def _before_step(self, optimizer, args, kwargs) -> None:
        upcoming = self.step + 1
        for name, layer in self.layers.items():
            if layer.weight.grad is None:
                continue
            if self._is_update(upcoming):
                self._grads[name] = layer.weight.grad.detach().clone()
            layer.weight.grad.mul_(self.masks[name])

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.step += 1
        if self._is_update(self.step):
            self._update()
        self._grads.clear()

    @torch.no_grad()
    def _update(self) -> None:
        fraction = self.drop_fraction / 2 * (1 + math.cos(math.pi * self.step / self.t_end))
        for name, layer in self.layers.items():
            mask = self.masks[name].reshape(-1)
            w = layer.weight.reshape(-1)
            active = mask.nonzero().squeeze(1)                      # row-major order
            n = int(fraction * active.numel())
            # Drop: smallest |w| among the active, earlier position first on ties.
            order = torch.sort(w[active].abs(), stable=True).indices
            after_drop = mask.clone()
            after_drop[active[order[:n]]] = False
            # Grow: largest |grad| among positions inactive after the drop, earlier first on ties.
            score = self._grads[name].reshape(-1).abs().clone()
            score[after_drop] = -1.0
            by_score = torch.sort(score, stable=True, descending=True).indices
            new_mask = after_drop.clone()
            new_mask[by_score[:n]] = True
            # Weights / state of positions that are no longer active go to zero; positions
            # grown from inactive are already zero.
            w.mul_(new_mask)
            state = self.optimizer.state.get(layer.weight, {})
            for key, value in state.items():
                if isinstance(value, Tensor) and value.shape == layer.weight.shape:
                    value.reshape(-1).mul_(new_mask)
            self.masks[name] = new_mask.view_as(self.masks[name])

    def remove(self) -> None:
        self._pre.remove()
        self._post.remove()
