"""Apply a topology change to a sparse layer: new CSR + transpose map, values and
optimizer state carried over, in O(nnz + g log g) with no dense round trip."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..formats import CSR
from ..formats.csr import check_index_tensor, kept_pattern
from .grow import check_keep
from .optimizer_state import gather_or_zero, remap_optimizer_state


def _merge_compiled(row_ptr: Tensor) -> bool:
    """True when the compiled CPU merge serves this pattern (else the torch-op path)."""
    from .. import _extension

    return (row_ptr.device.type == "cpu" and _extension.compiled()
            and hasattr(torch.ops.sparsekernels_C, "csr_merge_grow"))


@dataclass
class LayerUpdate:
    """What one update did to one layer."""

    nnz_before: int
    nnz_after: int
    dropped: int        # active entries removed (including ones regrown at once)
    grown: int          # positions activated (including just-dropped ones regrown)
    new: int            # grown positions that were not active before (start at zero)


def _check_grown(layer, grow_rows: object, grow_cols: object, shape: tuple[int, int]) -> None:
    """Grown positions: two 1-D integer tensors of one length, inside the stored matrix and,
    for a grouped convolution, inside their group's block (the merge would otherwise place
    an out-of-range column in the next row, or grow a weight the convolution never reads)."""
    check_index_tensor("update_layer", "grow_rows", grow_rows)
    check_index_tensor("update_layer", "grow_cols", grow_cols)
    if grow_rows.shape != grow_cols.shape:
        raise ValueError(f"update_layer: grow_rows and grow_cols must have one length, got {grow_rows.shape[0]} and "
                         f"{grow_cols.shape[0]}")
    if grow_rows.numel() == 0:
        return
    rows, cols = grow_rows.long(), grow_cols.long()
    if int(rows.min()) < 0 or int(rows.max()) >= shape[0] or int(cols.min()) < 0 or int(cols.max()) >= shape[1]:
        raise ValueError(f"update_layer: grown positions outside the stored matrix {tuple(shape)}")
    groups, rows_per_group, cols_per_group = layer.groups_layout
    if groups > 1 and bool((rows // rows_per_group != cols // cols_per_group).any()):
        raise ValueError(f"update_layer: grown positions must lie in their group's block ({groups} groups)")


def update_layer(layer, keep: Tensor, grow_rows: Tensor, grow_cols: Tensor, optimizers=()) -> tuple[LayerUpdate, Tensor]:
    """Rebuilds ``layer``'s pattern as (active entries with ``keep``) + grown positions.

    A grown position that was active before the drop (dropped and regrown in the same
    update) keeps its value and optimizer state; a truly new one starts at 0 with zero
    state. O(nnz + g log g) for g grown positions: the kept entries are already in order,
    the grown ones are sorted and merged in (no sort of all keys); a pure drop is a
    gather. ``layer.values`` stays the same Parameter object (resized), so optimizers keep
    working; its ``.grad`` is cleared.

    Args:
        keep: [nnz] bool over the current entries.
        grow_rows, grow_cols: int64 positions to activate; none may be an entry kept by ``keep``.
        optimizers: optimizers whose per-element state for ``layer.values`` is remapped.
    Returns:
        (stats, source) with ``source[i]`` the old index of new entry i or -1.
    """
    csr = layer.csr()
    n_cols = csr.shape[1]
    nnz = csr.values.numel()
    check_keep(layer, keep, "update_layer", optional=False)
    _check_grown(layer, grow_rows, grow_cols, csr.shape)
    old_values = layer.values.detach()
    n_kept = int(keep.sum())
    if grow_rows.numel() == 0:
        kept_idx = keep.nonzero().squeeze(1)
        # A pure drop: the kept entries' pattern is a gather (no keys, no sort).
        source = kept_idx
        new_csr = CSR.from_pattern(old_values[kept_idx], *kept_pattern(csr.row_ptr, csr.col_idx, kept_idx), csr.shape,
                                   check=False)
        n_grown = n_new = 0
    elif _merge_compiled(csr.row_ptr):
        # One O(nnz + g) pass in C++: grown positions bucketed by row, merged row by row.
        row_ptr, col_idx, source = torch.ops.sparsekernels_C.csr_merge_grow(
            csr.row_ptr, csr.col_idx, keep, grow_rows.long(), grow_cols.long(), n_cols)
        new_csr = CSR.from_pattern(gather_or_zero(old_values, source), row_ptr, col_idx, csr.shape, check=False)
        n_grown, n_new = grow_rows.numel(), int((source < 0).sum())
    else:
        kept_idx = keep.nonzero().squeeze(1)
        old_keys = csr.rows() * n_cols + csr.col_idx.long()
        # Sorted first: the searches below then walk old_keys in order (random grown
        # positions made each lookup a cache miss: 28 ms per layer for SET at 4096^2).
        grow_keys = torch.sort(grow_rows.long() * n_cols + grow_cols.long()).values
        if bool((grow_keys[1:] == grow_keys[:-1]).any()):
            raise ValueError("update_layer: grown positions must be distinct")
        # Was a grown position active before the drop? (old keys are sorted: row-major CSR.)
        pos = torch.searchsorted(old_keys, grow_keys).clamp_max(max(nnz - 1, 0))
        was_active = old_keys[pos] == grow_keys if nnz else torch.zeros_like(grow_keys, dtype=torch.bool)
        if nnz and bool((was_active & keep[pos]).any()):
            raise ValueError("update_layer: a grown position is already active")
        grow_source = torch.where(was_active, pos, torch.full_like(pos, -1))
        # Merge the two sorted key lists (kept: already in order; grown: sorted above)
        # instead of sorting all of them: each side's place is its own rank plus the
        # number of the other side's keys before it.
        kept_keys = old_keys[kept_idx]
        n_grow = grow_keys.numel()
        at_grow = torch.arange(n_grow, device=kept_keys.device) + torch.searchsorted(kept_keys, grow_keys)
        # The kept entries fill the remaining places in order (no search per kept entry).
        free = torch.ones(n_kept + n_grow, dtype=torch.bool, device=kept_keys.device)
        free[at_grow] = False
        at_kept = free.nonzero().squeeze(1)
        keys = torch.empty(n_kept + n_grow, dtype=torch.long, device=kept_keys.device)
        source = torch.empty_like(keys)
        keys[at_kept], keys[at_grow] = kept_keys, grow_keys
        source[at_kept], source[at_grow] = kept_idx, grow_source
        new_csr = CSR.from_indices(gather_or_zero(old_values, source), keys // n_cols, keys % n_cols, csr.shape,
                                   check=False)
        n_grown, n_new = grow_source.numel(), int((grow_source < 0).sum())

    old_nnz = old_values.numel()
    layer.set_csr(new_csr)
    layer.values.grad = None
    for opt in optimizers:
        remap_optimizer_state(opt, layer.values, source, old_nnz)
    stats = LayerUpdate(old_nnz, new_csr.values.numel(), old_nnz - n_kept, n_grown, n_new)
    return stats, source


def prune_to(layer, k: int, optimizers=()) -> LayerUpdate:
    """Keeps the ``k`` active weights of largest magnitude (dense-to-sparse phases: GMP,
    AC/DC's sparse phase, GaP). Ties as :func:`drop_smallest`."""
    from .drop import drop_smallest

    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= layer.nnz:
        raise ValueError(f"prune_to: k must be an int in [0, nnz = {layer.nnz}], got {k!r}")
    keep = drop_smallest(layer.values, layer.nnz - k)
    empty = torch.empty(0, dtype=torch.long, device=keep.device)
    return update_layer(layer, keep, empty, empty, optimizers)[0]


def grow_to_dense(layer, optimizers=()) -> LayerUpdate:
    """Activates every in-block position (AC/DC's dense phase, GaP): new weights start at
    zero with zero optimizer state; the active ones keep theirs."""
    from .grow import grow_all

    rows, cols = grow_all(layer)
    keep = torch.ones(layer.nnz, dtype=torch.bool, device=layer.values.device)
    return update_layer(layer, keep, rows, cols, optimizers)[0]
