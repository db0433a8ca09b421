"""transformers' ``Conv1D`` (GPT-2, GPT-J, ...): a linear layer ``y = x @ W + b`` whose
weight is stored transposed, W [in, out]. Found without importing transformers: an
instance can only exist once ``transformers.pytorch_utils`` is loaded, so looking the class
up in ``sys.modules`` finds it exactly when it matters and sparsekernels keeps working
without transformers installed."""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

_MODULE = "transformers.pytorch_utils"


def conv1d_class() -> type | None:
    """transformers' Conv1D class if transformers is loaded, else None."""
    cls = getattr(sys.modules.get(_MODULE), "Conv1D", None)
    return cls if isinstance(cls, type) else None


def is_conv1d(module: object) -> bool:
    """Whether ``module`` is a transformers Conv1D (or a subclass)."""
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_conv1d_class(cls: object) -> bool:
    """Whether ``cls`` is transformers' Conv1D or a subclass of it."""
    base = conv1d_class()
    return base is not None and isinstance(cls, type) and issubclass(cls, base)


def build_conv1d(cls: type, weight: Tensor, bias: Tensor | None, training: bool) -> nn.Module:
    """A ``cls`` (a Conv1D class) holding copies of ``weight`` [out, in] (the nn.Linear
    orientation; stored transposed, [in, out]) and ``bias`` [out], on the weight's device
    and in its dtype."""
    out_f, in_f = weight.shape
    dense = cls(out_f, in_f)  # Conv1D(nf=out, nx=in)
    dense.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(weight.t())
        if bias is not None:
            dense.bias.copy_(bias)
        else:  # Conv1D always has a bias; a layer without one adds zeros
            dense.bias.zero_()
    dense.train(training)
    return dense
