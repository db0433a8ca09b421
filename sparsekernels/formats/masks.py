"""Sparsity patterns: random and magnitude masks with an exact number of non-zeros."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_sparsity(sparsity: object, name: str = "sparsity") -> float:
    """Validates a sparsity level in [0, 1) and returns it as a float."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1), got {type(sparsity).__name__}")
    s = float(sparsity)
    if not math.isfinite(s) or not 0.0 <= s < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}")
    return s


def kept_count(numel: int, sparsity: float) -> int:
    """Non-zeros kept out of ``numel`` at ``sparsity`` (rounded, at least one when numel > 0
    so no layer is cut off entirely)."""
    if numel == 0:
        return 0
    return max(1, min(numel, int(round((1.0 - sparsity) * numel))))


def random_mask(shape: tuple[int, ...], sparsity: float, *, device=None,
                generator: torch.Generator | None = None) -> Tensor:
    """Boolean mask of ``shape`` with exactly ``kept_count`` true entries, uniform at random."""
    numel = math.prod(shape)
    keep = kept_count(numel, sparsity)
    mask = torch.zeros(numel, dtype=torch.bool, device=device)
    if keep:
        gen_device = generator.device if generator is not None else device
        idx = torch.randperm(numel, generator=generator, device=gen_device)[:keep]
        mask[idx.to(mask.device)] = True
    return mask.view(shape)


def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Boolean mask keeping the ``kept_count`` entries of largest ``|weight|``; ties go to
    the lower flat index, so the mask is deterministic."""
    flat = weight.detach().abs().reshape(-1)
    keep = kept_count(flat.numel(), sparsity)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=weight.device)
    if keep:
        order = torch.sort(flat, descending=True, stable=True).indices
        mask[order[:keep]] = True
    return mask.view(weight.shape)
