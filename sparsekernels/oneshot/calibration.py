"""Calibration: the layer-wise Hessian H = 2/N · X Xᵀ of a layer's inputs.

For the layer-wise reconstruction loss ‖W X − Ŵ X‖² (X [k, N]: the N input vectors of a
layer with k = in_features), the Hessian with respect to a row of W is H = 2 X Xᵀ; the
one-shot pruners (OBC, SparseGPT) work on its average over the calibration samples,
H = 2/N · Σ x xᵀ, as in SparseGPT (Frantar & Alistarh, ICML 2023).

* ``nn.Linear`` (and transformers ``Conv1D``): the input vectors are the rows of the input
  reshaped to [N, in_features].
* ``nn.Conv2d``: the input is unfolded (im2col) into its [N·L, C·kh·kw] patches, so a
  convolution is the linear layer W [out, C/groups·kh·kw] on them; a grouped convolution
  gets one Hessian per group (its rows only see their group's channels).

Only one layer's Hessian exists at a time: :func:`collect_hessian` runs the calibration
batches through the model up to that layer (stopping the forward there), so memory is
O(in_features²) per layer, and the inputs it sees come through the layers pruned before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _StopForward(Exception):
    """Raised by the calibration hook once the layer's input is recorded: the rest of the
    forward is not needed (SparseGPT's "catcher" trick)."""


def batch_call(batch) -> tuple[tuple, dict]:
    """The (args, kwargs) a model is called with for one loader item.

    A Tensor is the input; a tuple / list is ``(inputs, targets, ...)`` and its first
    element the input; a dict is passed as keyword arguments (minus a ``labels`` key).
    """
    if isinstance(batch, Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)) and len(batch) > 0:
        return (batch[0],), {}
    if isinstance(batch, dict) and batch:
        return (), {k: v for k, v in batch.items() if k != "labels"}
    raise TypeError("loader: every item must be a Tensor (the input), a non-empty tuple/list "
                    f"(inputs, targets, ...) or a non-empty dict of keyword inputs, got {type(batch).__name__}")


def materialise(loader: Iterable, owner: str = "prune") -> list:
    """The calibration batches as a list (the pruners pass over them once per layer, so a
    one-shot iterator or generator is read once and kept). Raises ValueError if empty."""
    if loader is None or isinstance(loader, (Tensor, str, bytes)) or not isinstance(loader, Iterable):
        raise TypeError(f"{owner}: loader must be an iterable of batches (e.g. a DataLoader or a list of "
                        f"tensors), got {type(loader).__name__}")
    batches = list(loader)
    if not batches:
        raise ValueError(f"{owner}: loader yielded no batches; calibration needs at least one")
    for b in batches:
        batch_call(b)  # type check every item up front, before any layer is changed
    return batches


def input_groups(module: nn.Module, x: Tensor) -> Tensor:
    """The input vectors of ``module`` for its input ``x``, as [N, groups, k] (k columns of
    the weight matrix per group; groups = 1 for linear layers)."""
    if isinstance(module, nn.Conv2d):
        if x.dim() not in (3, 4):
            raise ValueError(f"input_groups: a Conv2d's input must be [N, C, H, W] or [C, H, W], got {tuple(x.shape)}")
        if x.dim() == 3:
            x = x.unsqueeze(0)
        pad = module._reversed_padding_repeated_twice
        if any(pad):
            x = F.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)  # [B, C*kh*kw, L]
        cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return cols.reshape(cols.shape[0], module.groups, -1)
    return x.reshape(-1, 1, x.shape[-1])


class HessianAccumulator:
    """Running H = 2/N · Σ x xᵀ, [groups, k, k], over batches of input vectors.

    Kept as a running average (H ← H·n/(n+b) + 2/(n+b) · Xᵀ X) so its scale does not grow
    with the number of samples. ``dtype`` float32 by default (as SparseGPT).
    """

    def __init__(self, groups: int, k: int, *, dtype: torch.dtype = torch.float32, device=None) -> None:
        self.H = torch.zeros(groups, k, k, dtype=dtype, device=device)
        self.n = 0

    def add(self, x: Tensor) -> None:
        """``x`` [N, groups, k] input vectors."""
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != tuple(self.H.shape[:2]) or x.dim() != 3:
            raise ValueError(f"HessianAccumulator.add: x must be [N, {self.H.shape[0]}, {self.H.shape[1]}] "
                             f"(input_groups' layout), got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        b = x.shape[0]
        if b == 0:
            return
        x = x.detach().to(self.H.dtype)
        self.H.mul_(self.n / (self.n + b))
        self.n += b
        x = x * (2.0 / self.n) ** 0.5
        self.H.add_(torch.einsum("ngi,ngj->gij", x, x))


def weight_matrix(module: nn.Module) -> Tensor:
    """The weight of a linear / conv layer as the matrix the pruners work on,
    [out, in/groups·kh·kw] (a copy; a transformers Conv1D's [in, out] weight is transposed)."""
    from ..nn._conv1d import is_conv1d

    w = module.weight.detach()
    if is_conv1d(module):
        return w.t().clone()
    return w.reshape(w.shape[0], -1).clone()


def layer_groups(module: nn.Module) -> int:
    return module.groups if isinstance(module, nn.Conv2d) else 1


@torch.no_grad()
def collect_hessian(model: nn.Module, module: nn.Module, batches: list, *,
                    dtype: torch.dtype = torch.float32) -> tuple[Tensor, int]:
    """Runs ``batches`` through ``model`` until ``module`` and returns (H [groups, k, k], N),
    N the number of input vectors seen. Raises ValueError if ``module`` was never called."""
    if not isinstance(model, nn.Module) or not isinstance(module, nn.Module):
        raise TypeError("collect_hessian: model and module must be nn.Modules (module one of model's layers)")
    acc: list[HessianAccumulator] = []

    def hook(mod, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        cols = input_groups(mod, x)
        if not acc:
            acc.append(HessianAccumulator(cols.shape[1], cols.shape[2], dtype=dtype, device=cols.device))
        acc[0].add(cols)
        raise _StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            args, kwargs = batch_call(batch)
            try:
                model(*args, **kwargs)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if not acc or acc[0].n == 0:
        raise ValueError("collect_hessian: the layer received no input from the calibration batches")
    return acc[0].H, acc[0].n


@torch.no_grad()
def forward_with_pre_hooks(model: nn.Module, layers: dict[str, nn.Module], batch,
                           hook_for: Callable[[str], Callable]) -> None:
    """One forward of ``batch`` through ``model`` with ``hook_for(name)`` registered as a
    forward pre-hook (``hook(module, args, kwargs)``) on each of ``layers``, removed after."""
    handles = [module.register_forward_pre_hook(hook_for(name), with_kwargs=True) for name, module in layers.items()]
    try:
        args, kwargs = batch_call(batch)
        model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()


def execution_order(model: nn.Module, layers: dict[str, nn.Module], batch) -> list[str]:
    """Names of ``layers`` in the order the model calls them on ``batch`` (one forward);
    layers the forward never reaches are left out."""
    order: list[str] = []

    def hook_for(name: str) -> Callable:
        def hook(mod, args, kwargs):
            if name not in order:
                order.append(name)
        return hook

    forward_with_pre_hooks(model, layers, batch, hook_for)
    return order


def damped(H: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """(H + λI, dead) for H [k, k]: λ = damp · mean(diag H) (SparseGPT's relative
    dampening); ``dead`` [k] marks inputs that were always zero (diag H = 0), whose diagonal
    is set to 1 first so H stays invertible (their weights are pruned for free)."""
    H = H.clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0
    lam = damp * diag.mean()
    diag.add_(lam)
    return H, dead
