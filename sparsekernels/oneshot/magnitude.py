"""Magnitude pruning: the baseline the second-order pruners are measured against."""

from __future__ import annotations

from torch import Tensor

from ..formats import kept_count
from .patterns import lowest_mask, nm_prune_mask


def magnitude_prune(W: Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Zeroes the smallest-|w| weights of ``W`` [rows, cols], no weight update.

    Unstructured: ``numel − kept_count(numel, sparsity)`` weights of the whole matrix
    (ties to the lower index). N:M: the M − N smallest of each group of M along a row.
    Returns (Ŵ [rows, cols] with zeros where pruned, kept mask [rows, cols] bool).
    """
    score = W.abs()
    if nm is not None:
        pruned = nm_prune_mask(score, nm)
    else:
        pruned = lowest_mask(score, W.numel() - kept_count(W.numel(), sparsity))
    return W.masked_fill(pruned, 0), ~pruned
