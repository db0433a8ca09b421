"""Grow: choose inactive positions of a sparse layer to activate.

Positions are (row, col) of the layer's stored matrix (for a grouped convolution, the
block-diagonal matrix over the unfolded input; only in-block positions are ever grown).
``exclude`` describes the positions that must not be chosen: the layer's pattern with
``keep`` applied (the weights still active after the drop step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..formats.csr import kept_pattern, row_ptr_from_rows
from ..ops import topk_grow


def _active_keys(layer, keep: Tensor | None) -> Tensor:
    """Sorted flat keys (row * cols + col) of the active positions after ``keep``."""
    n_cols = layer.csr().shape[1]
    keys = layer.csr().rows() * n_cols + layer.col_idx.long()
    return keys if keep is None else keys[keep]


def inactive_count(layer, keep: Tensor | None = None) -> int:
    """In-block positions not active after ``keep``."""
    groups, rows, cols = layer.groups_layout
    active = layer.nnz if keep is None else int(keep.sum())
    return groups * rows * cols - active


def grow_by_gradient(layer, x: Tensor, dy: Tensor, n: int, keep: Tensor | None = None,
                     tile_elems: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The ``n`` inactive positions with the largest ``|dy^T x|`` (RigL).

    Args:
        layer: a SparseLinear / SparseConv2d.
        x: [M, cols] the layer's matmul input, dy: [M, rows] its output gradient.
        keep: [nnz] bool, the entries that stay active (positions excluded from growth).
    Returns:
        (rows int64 [n], cols int64 [n], scores [n]) in the stored matrix's coordinates.
    """
    groups, rpg, cpg = layer.groups_layout
    n_cols = layer.csr().shape[1]
    kwargs = {} if tile_elems is None else {"tile_elems": tile_elems}
    if groups == 1:
        # The exclusion pattern is the layer's own with ``keep`` applied: a gather, and
        # each row's start the number of kept entries before it (no flat keys).
        row_ptr, col_idx = layer.row_ptr, layer.col_idx
        if keep is not None:
            row_ptr, col_idx = kept_pattern(row_ptr, col_idx, keep.nonzero().squeeze(1))
        k = min(n, rpg * cpg - col_idx.numel())
        return topk_grow(dy.contiguous(), x.contiguous(), row_ptr, col_idx, k, **kwargs)
    keys = _active_keys(layer, keep)
    rows_all, cols_all = keys // n_cols, keys % n_cols
    cand = []
    for g in range(groups):
        r0, c0 = g * rpg, g * cpg
        sel = (rows_all >= r0) & (rows_all < r0 + rpg)
        row_ptr = row_ptr_from_rows(rows_all[sel] - r0, rpg)
        col_idx = (cols_all[sel] - c0).to(torch.int32)
        k = min(n, rpg * cpg - col_idx.numel())
        r, c, s = topk_grow(dy[:, r0:r0 + rpg].contiguous(), x[:, c0:c0 + cpg].contiguous(), row_ptr, col_idx, k, **kwargs)
        cand.append((r + r0, c + c0, s))
    rows = torch.cat([c[0] for c in cand])
    cols = torch.cat([c[1] for c in cand])
    scores = torch.cat([c[2] for c in cand])
    if groups > 1:  # best n over all groups: score descending, ties by flat position
        flat = rows * n_cols + cols
        by_pos = torch.argsort(flat)
        order = by_pos[torch.sort(scores[by_pos], stable=True, descending=True).indices][:n]
        rows, cols, scores = rows[order], cols[order], scores[order]
    return rows, cols, scores


def grow_random(layer, n: int, generator: torch.Generator, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``n`` distinct inactive in-block positions drawn uniformly at random (SET).

    Rejection sampling against the sorted active keys: O(n log nnz) per round, no dense
    mask, and the same ``generator`` state gives the same positions on every rank."""
    groups, rpg, cpg = layer.groups_layout
    n_cols = layer.csr().shape[1]
    inactive = inactive_count(layer, keep)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= inactive:
        raise ValueError(f"grow_random: n must be an int in [0, {inactive}] (inactive positions), got {n!r}")
    active = _active_keys(layer, keep).cpu()
    total_rows = groups * rpg
    chosen = torch.empty(0, dtype=torch.long)
    if 2 * n > inactive:
        # Rejection sampling slows to a crawl when most free positions are wanted (the last
        # few are rarely hit); then list the free positions, O(nnz + inactive) = O(nnz + n).
        r_all, c_all = grow_all(layer, keep)
        free = (r_all * n_cols + c_all).cpu()
        chosen = free[torch.randperm(free.numel(), generator=generator)[:n]]
    while chosen.numel() < n:
        want = max(2 * (n - chosen.numel()), 64)
        r = torch.randint(0, total_rows, (want,), generator=generator)
        c = torch.randint(0, cpg, (want,), generator=generator) + (r // rpg) * cpg
        keys = r * n_cols + c
        if active.numel():
            # Looked up in sorted order (sequential walks of ``active`` instead of a cache
            # miss per random key), the verdicts put back in draw order.
            sorted_keys, order = torch.sort(keys)
            pos = torch.searchsorted(active, sorted_keys).clamp_max(active.numel() - 1)
            hit = torch.empty_like(keys, dtype=torch.bool)
            hit[order] = active[pos] == sorted_keys
            keys = keys[~hit]
        fresh = keys
        # Keep first occurrences in draw order (deterministic), skipping ones already chosen.
        merged = torch.cat([chosen, fresh])
        uniq, inverse = torch.unique(merged, return_inverse=True)
        first = torch.full((uniq.numel(),), merged.numel(), dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(merged.numel()), reduce="amin")
        chosen = merged[torch.sort(first).values][:n]
    device = layer.values.device
    return (chosen // n_cols).to(device), (chosen % n_cols).to(device)


def grow_all(layer, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Every inactive in-block position (dense phases of AC/DC or GaP), row-major."""
    groups, rpg, cpg = layer.groups_layout
    n_cols = layer.csr().shape[1]
    device = layer.values.device
    r = torch.arange(groups * rpg, device=device).repeat_interleave(cpg)
    c = torch.arange(cpg, device=device).repeat(groups * rpg) + (r // rpg) * cpg
    keys = r * n_cols + c
    active = _active_keys(layer, keep)
    free = ~torch.isin(keys, active)
    return r[free], c[free]
