"""Optimizer state follows the values through a topology update."""

from __future__ import annotations

import torch
from torch import Tensor


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
    state = optimizer.state.get(param)
    if not state:
        return 0
    all_kept = bool((source >= 0).all())  # a pure drop: one gather, no fill
    remapped = 0
    for key, value in list(state.items()):
        if isinstance(value, Tensor) and value.dim() == 1 and value.numel() == old_numel and key != "step":
            state[key] = value.index_select(0, source) if all_kept else gather_or_zero(value, source)
            remapped += 1
    return remapped
