"""Drop: the active weights of smallest magnitude."""

from __future__ import annotations

import torch
from torch import Tensor


def drop_smallest(values: Tensor, n: int) -> Tensor:
    """Keep-mask [nnz] (bool) that drops the ``n`` entries of smallest ``|values|``.

    Ties are broken by position: among equal magnitudes the earlier entry (row-major
    order of the pattern) is dropped first, so every rank and every rerun agree."""
    nnz = values.numel()
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= nnz:
        raise ValueError(f"drop_smallest: n must be an int in [0, nnz = {nnz}], got {n!r}")
    keep = torch.ones(nnz, dtype=torch.bool, device=values.device)
    if n:
        order = torch.sort(values.detach().abs(), stable=True).indices
        keep[order[:n]] = False
    return keep
