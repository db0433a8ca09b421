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


def check_keep(layer, keep: object, owner: str | None = None, optional: bool = True) -> None:
    """``keep``: a bool tensor [nnz] (one flag per stored entry of the layer), or None where
    ``optional``. A shorter one had been indexed as it was: positions already active were
    grown again. ``owner`` prefixes the message."""
    if keep is None and optional:
        return
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (layer.nnz,):
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, Tensor) else type(keep).__name__
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}keep must be a bool tensor [nnz = {layer.nnz}] (one flag per stored entry), "
                         f"got {got}")


def _active_keys(layer, keep: Tensor | None) -> Tensor:
    """Sorted flat keys (row * cols + col) of the active positions after ``keep``."""
    n_cols = layer.csr().shape[1]
    keys = layer.csr().rows() * n_cols + layer.col_idx.long()
    return keys if keep is None else keys[keep]


def _active_pattern(layer, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """(row_ptr, col_idx) of the active positions after ``keep``: the layer's own pattern
    with ``keep`` applied, a gather with each row's start the number of kept entries
    before it (no flat keys)."""
    if keep is None:
        return layer.row_ptr, layer.col_idx
    return kept_pattern(layer.row_ptr, layer.col_idx, keep.nonzero().squeeze(1))


def inactive_count(layer, keep: Tensor | None = None) -> int:
    """In-block positions not active after ``keep``."""
    check_keep(layer, keep)
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
    check_keep(layer, keep)
    groups, rpg, cpg = layer.groups_layout
    n_cols = layer.csr().shape[1]
    kwargs = {} if tile_elems is None else {"tile_elems": tile_elems}
    if groups == 1:
        row_ptr, col_idx = _active_pattern(layer, keep)  # the positions excluded from growth
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


def _distinct_ranks(total: int, n: int, generator: torch.Generator) -> Tensor:
    """``n`` distinct integers drawn uniformly from [0, total) (int64, ascending), for
    ``n`` well below ``total``. Independent uniform draws, their union sorted (duplicates
    merged), more drawn while fewer than ``n`` are distinct, then a uniform n-subset of
    the union: the union of i.i.d. draws is exchangeable, and so is the stopping rule (it
    sees only the union's size), so every n-subset is equally likely. O(n log n)."""
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < n:
        need = n - chosen.numel()
        # Enough for the expected repeats among the draws and against the chosen ones.
        draws = need + (need + chosen.numel()) * need // max(total, 1) + 64
        chosen = torch.unique(torch.cat([chosen, torch.randint(0, total, (draws,), generator=generator)]))
    if chosen.numel() > n:  # drop a uniform random few (the order stays ascending)
        kept = torch.ones(chosen.numel(), dtype=torch.bool)
        kept[torch.randperm(chosen.numel(), generator=generator)[:chosen.numel() - n]] = False
        chosen = chosen[kept]
    return chosen


def grow_random(layer, n: int, generator: torch.Generator, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``n`` distinct inactive in-block positions drawn uniformly at random (SET).

    The inactive positions are numbered row-major; ``n`` distinct numbers are drawn and
    each is turned into its (row, column) by two binary searches over the active pattern,
    O(nnz + n log nnz) with no dense mask. The same ``generator`` state gives the same
    positions on every rank. Returned in row-major order."""
    groups, rpg, cpg = layer.groups_layout
    inactive = inactive_count(layer, keep)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= inactive:
        raise ValueError(f"grow_random: n must be an int in [0, {inactive}] (inactive positions), got {n!r}")
    device = layer.values.device
    if 2 * n > inactive:
        # Most free positions wanted: list them, O(nnz + inactive) = O(nnz + n).
        r_all, c_all = grow_all(layer, keep)
        pick = torch.randperm(r_all.numel(), generator=generator)[:n].sort().values.to(r_all.device)
        return r_all[pick], c_all[pick]
    row_ptr, col_idx = (t.long().cpu() for t in _active_pattern(layer, keep))
    rows = groups * rpg
    active = row_ptr[1:] - row_ptr[:-1]
    # Inactive positions before each row (its in-block columns less its active ones).
    starts = torch.zeros(rows + 1, dtype=torch.long)
    starts[1:] = torch.cumsum(cpg - active, 0)
    # For the active entry i of row r (local column k_i, i-th of its row): u = k_i - i +
    # starts[r]. The inactive position numbered j (row r, local rank j - starts[r]) lies
    # at local column (j - starts[r]) + #{i : k_i - i <= j - starts[r]}. u never
    # decreases along the pattern (k_{i+1} >= k_i + 1, and a row's last u is at most
    # starts[r + 1]), so one searchsorted over u counts, for every j, all entries of the
    # rows before r plus those of row r that lie before it.
    # u = col_idx - (global entry index) + (row start + starts[r] - the row's block start),
    # the last term repeated over each row's entries.
    row_offset = row_ptr[:-1] + starts[:-1] - (torch.arange(rows) // rpg) * cpg
    u = col_idx - torch.arange(col_idx.numel()) + torch.repeat_interleave(row_offset, active,
                                                                          output_size=col_idx.numel())
    j = _distinct_ranks(inactive, n, generator)
    r = torch.searchsorted(starts, j, right=True) - 1
    before = torch.searchsorted(u, j, right=True) - row_ptr[r]
    c = (r // rpg) * cpg + (j - starts[r]) + before
    return r.to(device), c.to(device)


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
