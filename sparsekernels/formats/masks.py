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
    """Boolean mask keeping the ``kept_count`` entries of largest ``|weight|``.

    Order: ``|w|`` descending with NaN above every number (the order of ``torch.sort``);
    among equal magnitudes (and among NaNs) the lower flat index is kept, so the mask is
    deterministic and identical to a stable descending sort's first ``kept_count``.

    O(numel) selection, not a sort: the cut-off magnitude is the ``kept_count``-th largest
    (``kthvalue``), everything above it is kept, and the entries equal to it fill the rest
    in index order (a full sort of every layer made ``sparsify`` of resnet18 take seconds).
    """
    flat = weight.detach().abs().reshape(-1)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # exact; the selection kernels cover fp32 / fp64 everywhere
    numel = flat.numel()
    keep = kept_count(numel, sparsity)
    if keep == numel:
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    if keep == 0:
        return torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    mask = None
    if bool(flat.isnan().any()):
        # NaNs first, in index order (they rank above every number and tie among
        # themselves); the rest is selected among the numbers, -1 standing for a NaN.
        nan = flat.isnan()
        nans = nan.nonzero().squeeze(1)
        mask = torch.zeros(numel, dtype=torch.bool, device=weight.device)
        mask[nans[:keep]] = True
        if nans.numel() >= keep:
            return mask.view(weight.shape)
        keep -= nans.numel()
        flat = flat.masked_fill(nan, -1.0)
    # kthvalue counts from the smallest: the keep-th largest is the (numel - keep + 1)-th smallest.
    cut = torch.kthvalue(flat, numel - keep + 1).values
    chosen = flat >= cut
    n_chosen = int(torch.count_nonzero(chosen))  # a bool sum widens to int64 first: ~3x slower
    if n_chosen > keep:
        # More entries equal the cut-off than fit: keep all above it, then the tied ones of
        # lowest index (the common case, no such tie, needs no second pass).
        chosen = flat > cut
        tied = (flat == cut).nonzero().squeeze(1)
        chosen[tied[: keep - (n_chosen - tied.numel())]] = True
    if mask is not None:
        chosen |= mask
    return chosen.view(weight.shape)
