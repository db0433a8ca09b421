"""Helpers that keep masks identical on every rank of a torch.distributed job."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_rows(t: Tensor) -> Tensor:
    """Concatenation over ranks of ``t`` [M_r, ...] along dim 0 (M_r may differ per rank).

    RigL scores a weight by the dense gradient of the step, which under data parallelism
    is (1/world) * sum_r dy_r^T x_r = (1/world) * [dy_1; ...]^T [x_1; ...]: gathering the
    rows of x and dy gives every rank the same scores (the scale does not change the
    ranking) without all-reducing a dense gradient."""
    n = world_size()
    if n == 1:
        return t
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])
