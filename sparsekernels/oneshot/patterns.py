"""Sparsity targets of the one-shot pruners: unstructured (a fraction) or N:M."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_int, check_positive_number
from ..formats import check_sparsity


def parse_pattern(pattern: object) -> tuple[int, int] | None:
    """``None`` (unstructured) or ``"N:M"`` / ``(N, M)`` with 1 <= N < M: keep N of every M
    consecutive weights along a row (the reduction dimension)."""
    if pattern is None:
        return None
    if isinstance(pattern, str):
        parts = pattern.split(":")
        try:
            n, m = (int(p) for p in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            n, m = None, None
    elif isinstance(pattern, (tuple, list)) and len(pattern) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in pattern):
        n, m = pattern
    else:
        raise TypeError(f"pattern must be None, a string 'N:M' or a tuple (N, M), got {pattern!r}")
    if n is None or not 1 <= n < m:
        raise ValueError(f"pattern must be 'N:M' with integers 1 <= N < M (e.g. '2:4'), got {pattern!r}")
    return n, m


def resolve_target(sparsity: object, nm: tuple[int, int] | None) -> float:
    """The sparsity the pruner aims at: ``sparsity`` (default 0.5) when unstructured;
    1 − N/M for N:M, where a given ``sparsity`` must agree."""
    if nm is None:
        return 0.5 if sparsity is None else check_sparsity(sparsity)
    implied = 1.0 - nm[0] / nm[1]
    if sparsity is not None and abs(check_sparsity(sparsity) - implied) > 1e-9:
        raise ValueError(f"sparsity={sparsity!r} disagrees with pattern {nm[0]}:{nm[1]}, which fixes it at "
                         f"{implied:g}; leave sparsity unset with a pattern")
    return implied


def check_nm_columns(cols: int, nm: tuple[int, int] | None, name: str) -> None:
    if nm is not None and cols % nm[1]:
        raise ValueError(f"pattern {nm[0]}:{nm[1]} needs the layer's in_features (reduction dimension) divisible "
                         f"by {nm[1]}; layer {name!r} has {cols}")


def nm_prune_mask(score: Tensor, nm: tuple[int, int]) -> Tensor:
    """Boolean [rows, cols] mask of the weights to PRUNE: the M − N lowest ``score`` of
    every group of M consecutive columns."""
    n, m = nm
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    low = torch.topk(groups, m - n, dim=-1, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, low, True).reshape(rows, cols)


def lowest_mask(score: Tensor, count: int) -> Tensor:
    """Boolean mask (shape of ``score``) of the ``count`` lowest scores (ties: lower index)."""
    flat = score.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=score.device)
    if count > 0:
        mask[torch.sort(flat, stable=True).indices[:count]] = True
    return mask.view(score.shape)


def check_layer_problem(owner: str, W: object, H: object, damp: object, sparsity: object = 0.0,
                        nm: object = None) -> tuple[int, int] | None:
    """W [rows, k] floating, H [k, k] floating and finite on W's device, damp a finite
    number > 0, sparsity in [0, 1), ``nm`` None / "N:M" / (N, M) with 1 <= N < M and k
    divisible by M. Returns ``nm`` parsed."""
    check_sparsity(sparsity)
    nm = parse_pattern(nm)
    if not isinstance(W, Tensor) or W.dim() != 2 or not W.dtype.is_floating_point:
        got = f"{tuple(W.shape)} {W.dtype}" if isinstance(W, Tensor) else type(W).__name__
        raise ValueError(f"{owner}: W must be a 2-D floating tensor [rows, k], got {got}")
    k = W.shape[1]
    if not isinstance(H, Tensor) or tuple(H.shape) != (k, k) or not H.dtype.is_floating_point:
        got = f"{tuple(H.shape)} {H.dtype}" if isinstance(H, Tensor) else type(H).__name__
        raise ValueError(f"{owner}: H must be a floating [{k}, {k}] tensor (k = W's columns), got {got}")
    if H.device != W.device:
        raise ValueError(f"{owner}: H is on {H.device} but W on {W.device}")
    check_positive_number("damp", damp, owner)
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"{owner}: H holds NaN or inf (the calibration inputs, or the activations reaching this "
                         "layer, are not finite)")
    check_nm_columns(k, nm, owner)
    return nm


def check_block_size(owner: str, block_size: object, nm: tuple[int, int] | None) -> int:
    """A column block size: a positive int, and a multiple of M for N:M (a block must hold
    whole groups)."""
    check_int("block_size", block_size, owner)
    if nm is not None and block_size % nm[1]:
        raise ValueError(f"{owner}: block_size ({block_size}) must be a multiple of M = {nm[1]} for pattern "
                         f"{nm[0]}:{nm[1]}")
    return block_size
