"""Optimizer state follows the values through a topology update."""

from __future__ import annotations

import torch
from torch import Tensor


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
    kept = source >= 0
    all_kept = bool(kept.all())  # a pure drop: one gather, no masked writes
    remapped = 0
    for key, value in list(state.items()):
        if isinstance(value, Tensor) and value.dim() == 1 and value.numel() == old_numel and key != "step":
            if all_kept:
                state[key] = value[source]
            else:
                new = value.new_zeros(source.numel())
                new[kept] = value[source[kept]]
                state[key] = new
            remapped += 1
    return remapped
