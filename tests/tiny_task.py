"""A tiny float64 regression task for the mask-decision tests of the ensemble methods
(EDST, Sup-tickets): small enough that a masked-dense reference run takes milliseconds."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def tiny_mlp(seed=0):
    """12 -> 32 -> 24 -> 5 with tanh, float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 5)).double()


def tiny_batches(n, seed=1, batch=16):
    """``n`` fixed (x [batch, 12], y [batch, 5]) float64 batches."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 12, generator=g, dtype=torch.float64),
             torch.randn(batch, 5, generator=g, dtype=torch.float64)) for _ in range(n)]


def mse_step(model, opt, batch):
    """One optimizer step on the mean squared error of ``batch``."""
    x, y = batch
    opt.zero_grad(set_to_none=True)
    F.mse_loss(model(x), y).backward()
    opt.step()
