"""Optimizer state follows the values through a topology update."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .._checks import check_int
from ..formats.csr import check_index_tensor


def gather_or_zero(values: Tensor, source: Tensor) -> Tensor:
    """``values[source]`` with 0 where ``source`` is -1: a gather and a fill, where masked
    indexing (``new[kept] = values[source[kept]]``) costs two nonzero passes and a scatter."""
    if values.numel() == 0:  # nothing to gather from: every entry is new
        return values.new_zeros(source.shape)
    return values.index_select(0, source.clamp_min(0)).masked_fill_(source < 0, 0)


def remap_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, source: Tensor,
                          old_numel: int) -> int:
    """Re-index ``param``'s per-element state after its values were rebuilt.

    ``source[i]`` is the old index of new entry i, or -1 for a newly grown entry: kept
    entries keep their state (momentum, Adam's moments, ...), grown ones start at zero.
    Per-element state is every tensor of ``old_numel`` elements (``momentum_buffer``,
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ...); scalars such as Adam's ``step``
    are left alone. Returns how many state tensors were remapped."""
    owner = "remap_optimizer_state"
    if not isinstance(getattr(optimizer, "state", None), Mapping):
        raise TypeError(f"{owner}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    check_index_tensor(owner, "source", source)
    check_int("old_numel", old_numel, owner, minimum=0)
    if source.numel() and (int(source.min()) < -1 or int(source.max()) >= old_numel):
        raise ValueError(f"{owner}: source entries must lie in [-1, old_numel = {old_numel})")
    state = optimizer.state.get(param)
    if not state:
        return 0
    # A per-element state tensor of another length than old_numel would be left at its old
    # size (and misread by the next step): say so instead.
    sizes = {v.numel() for k, v in state.items()
             if isinstance(v, Tensor) and v.dim() == 1 and v.numel() > 1 and k != "step"}
    if sizes - {old_numel}:
        raise ValueError(f"{owner}: old_numel = {old_numel} but the per-element state holds {sorted(sizes)} entries")
    all_kept = bool((source >= 0).all())  # a pure drop: one gather, no fill
    remapped = 0
    for key, value in list(state.items()):
        if isinstance(value, Tensor) and value.dim() == 1 and value.numel() == old_numel and key != "step":
            state[key] = value.index_select(0, source) if all_kept else gather_or_zero(value, source)
            remapped += 1
    return remapped
