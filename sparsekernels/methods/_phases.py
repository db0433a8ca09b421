"""What the dense/sparse phase methods (AC/DC, GaP) share: phase lengths given as steps or
fractions of ``total_steps``, and the re-compression of a layer at density 1 to its
largest-magnitude weights (one layer, or all layers against one global threshold)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..formats import CSR, kept_count
from ..formats.masks import largest_k_masks
from ..topology import update_layer


def steps_of(name: str, value: object, total_steps: int, *, allow_zero: bool = False) -> int:
    """A phase length or point in optimizer steps: an int is steps, a float a fraction of
    ``total_steps`` (rounded). ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{name} must be an int (steps) or a float (fraction of total_steps), got {value!r}")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} as a fraction of total_steps must be in [0, 1], got {value!r}")
        value = int(round(value * total_steps))
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'} "
                         f"(got {value} steps of total_steps = {total_steps})")
    return value


def in_block_numel(layer: nn.Module) -> int:
    """Entries of the layer's logical dense weight (in-block positions of a grouped conv)."""
    groups, rows, cols = layer.groups_layout
    return groups * rows * cols


def check_full(owner: str, name: str, layer: nn.Module) -> None:
    if layer.nnz != in_block_numel(layer):
        raise RuntimeError(f"{owner}: layer '{name}' should be at density 1 before it is re-compressed, "
                           f"holds {layer.nnz} of {in_block_numel(layer)} weights")


def keep_largest(values: Tensor, k: int) -> Tensor:
    """Keep-mask [numel] (bool) of the ``k`` entries of largest ``|values|``; among equal
    magnitudes the earlier entry is kept (a stable descending sort's first ``k``)."""
    return largest_k_masks([values.detach().reshape(-1)], min(k, values.numel()))[0]


def compress(layers: dict[str, nn.Module], keeps: dict[str, Tensor], optimizer) -> dict[str, dict]:
    """Applies each keep-mask (nothing grown); the kept weights keep their optimizer state."""
    out = {}
    for name, keep in keeps.items():
        layer = layers[name]
        empty = torch.empty(0, dtype=torch.long, device=keep.device)
        stats, _ = update_layer(layer, keep, empty, empty, [optimizer])
        out[name] = {"nnz": stats.nnz_after, "dropped": stats.dropped, "grown": 0, "new": 0}
    return out


def full_pattern(layer: nn.Module, device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The CSR pattern with its transpose map (row_ptr, col_idx, t_row_ptr, t_col_idx,
    t_perm; int32) of every in-block position of the layer's stored matrix, row-major,
    written down directly in O(numel): no sort, no set test, no counting sort."""
    groups, rpg, cpg = layer.groups_layout
    n_rows, n_cols = layer.csr().shape
    i32 = {"dtype": torch.int32, "device": device}
    rows, cols = torch.arange(n_rows, **i32), torch.arange(n_cols, **i32)
    row_ptr = torch.arange(n_rows + 1, **i32) * cpg
    # Row r (group r // rpg) holds the cpg columns of its group's block, in order.
    col_idx = (((rows // rpg) * cpg).unsqueeze(1) + torch.arange(cpg, **i32)).reshape(-1)
    # Column c (group c // cpg) holds the rpg rows of its group, in order; entry (r, c) is
    # values[r * cpg + c % cpg].
    t_row_ptr = torch.arange(n_cols + 1, **i32) * rpg
    t_rows = ((cols // cpg) * rpg).unsqueeze(1) + torch.arange(rpg, **i32)  # [n_cols, rpg]
    t_perm = (t_rows * cpg + (cols % cpg).unsqueeze(1)).reshape(-1)
    return row_ptr, col_idx, t_row_ptr, t_rows.reshape(-1), t_perm


def grow_full(layer: nn.Module, optimizers=()) -> dict:
    """Activates every in-block position of ``layer``: what ``topology.grow_to_dense`` does
    (new weights 0 with zero optimizer state, active ones keep value and state; the same
    pattern tensors), without its O(numel log numel) set test and sort: the full pattern
    is known, so the old entries are scattered to their row-major positions."""
    csr = layer.csr()
    device = layer.values.device
    groups, rpg, cpg = layer.groups_layout
    numel = groups * rpg * cpg
    if numel >= 2**31:
        raise ValueError(f"grow_full: {numel} weights do not fit int32 CSR indices")
    pattern = full_pattern(layer, device)
    old_rows, old_cols = csr.rows(), csr.col_idx.long()
    position = old_rows * cpg + (old_cols - (old_rows // rpg) * cpg)
    values = torch.zeros(numel, dtype=layer.values.dtype, device=device)
    values[position] = layer.values.detach()
    old_nnz = layer.values.numel()
    layer.set_csr(CSR(values, *pattern, tuple(csr.shape)))
    for opt in optimizers:
        # As topology.remap_optimizer_state (every 1-D per-element tensor but "step"), by a
        # scatter of the old entries instead of a gather through a numel-long source map
        # (that one costs more than the whole growth at 4096 x 4096).
        state = opt.state.get(layer.values)
        for key, value in list((state or {}).items()):
            if isinstance(value, Tensor) and value.dim() == 1 and value.numel() == old_nnz and key != "step":
                grown = value.new_zeros(numel)
                grown[position] = value
                state[key] = grown
    return {"nnz": numel, "dropped": 0, "grown": numel - old_nnz, "new": numel - old_nnz}


def decompress(layers: dict[str, nn.Module], optimizer) -> dict[str, dict]:
    """Grows every layer to density 1: new weights and their optimizer state start at zero."""
    return {name: grow_full(layer, [optimizer]) for name, layer in layers.items()}


def global_keeps(layers: dict[str, nn.Module], sparsity: float) -> dict[str, Tensor]:
    """One magnitude threshold over all layers: the ``kept_count(total, sparsity)`` largest
    |w| of the concatenation (layer order, row-major within a layer) are kept."""
    values = [layer.values.detach() for layer in layers.values()]
    return dict(zip(layers, largest_k_masks(values, kept_count(sum(v.numel() for v in values), sparsity))))
