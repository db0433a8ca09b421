"""Magnitude pruning: the baseline the second-order pruners are measured against."""

from __future__ import annotations

from torch import Tensor

from ..formats import check_sparsity, kept_count
from .patterns import check_nm_columns, lowest_mask, nm_prune_mask, parse_pattern


def magnitude_prune(W: Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Zeroes the smallest-|w| weights of ``W`` [rows, cols], no weight update.

    Unstructured: ``numel − kept_count(numel, sparsity)`` weights of the whole matrix
    (ties to the lower index). N:M: the M − N smallest of each group of M along a row.
    Returns (Ŵ [rows, cols] with zeros where pruned, kept mask [rows, cols] bool).
    """
    if not isinstance(W, Tensor) or W.dim() != 2 or not W.dtype.is_floating_point:
        raise ValueError(f"magnitude_prune: W must be a 2-D floating tensor [rows, cols], got "
                         f"{tuple(W.shape) if isinstance(W, Tensor) else type(W).__name__}")
    sparsity = check_sparsity(sparsity)
    nm = parse_pattern(nm)
    check_nm_columns(W.shape[1], nm, "magnitude_prune")
    score = W.abs()
    if nm is not None:
        pruned = nm_prune_mask(score, nm)
    else:
        pruned = lowest_mask(score, W.numel() - kept_count(W.numel(), sparsity))
    return W.masked_fill(pruned, 0), ~pruned
