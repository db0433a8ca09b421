"""Helpers that keep masks identical on every rank of a torch.distributed job, and the
check of which sharded (FSDP) set-ups a method can train."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


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


def _is_sharded(p: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor has no FSDP2 either
        return False
    return isinstance(p, DTensor)


def check_fsdp(method, model: nn.Module, include, exclude) -> None:
    """Raises ValueError, before anything is changed, when ``model`` is sharded in a way
    ``method`` cannot train.

    What works: FSDP2 (``torch.distributed.fsdp.fully_shard``) with a method that never
    changes the topology (Static): each layer's 1-D ``values`` is sharded on dim 0 like any
    parameter and the pattern buffers are replicated, so the sparse layers train as usual.
    The layers must be sparse before ``fully_shard`` (``sparsify(model, ...)``, then
    ``fully_shard``, then the optimizer, then the method).

    What cannot: a method whose topology update rewrites ``values`` and its pattern (RigL,
    SET, GMP, ...): the update reorders the non-zeros across the whole parameter and GMP
    changes its length, while FSDP2 keeps each rank's dim-0 shard of a fixed layout (and
    the optimizer state sharded alike); following a new pattern would need re-sharding the
    parameter and its optimizer state at every update. FSDP1 (``FullyShardedDataParallel``)
    flattens the layers' parameters into one buffer, which the methods cannot address. DDP
    (``DistributedDataParallel``) replicates the parameters and works with every method.
    """
    from torch.distributed import fsdp

    from ..nn import eligible_layers
    from .base import SparseTrainingMethod

    cls = type(method).__name__
    fsdp1 = getattr(fsdp, "FullyShardedDataParallel", None)
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
        raise ValueError(f"{cls}: the model is wrapped in FullyShardedDataParallel (FSDP1), which flattens the "
                         "layers' parameters into one sharded buffer that sparse training cannot address; use "
                         "DistributedDataParallel, or (Static only) fully_shard (FSDP2) after sparsify")
    fsdp2 = getattr(fsdp, "FSDPModule", None)
    sharded = (fsdp2 is not None and any(isinstance(m, fsdp2) for m in model.modules())) or any(
        _is_sharded(p) for p in model.parameters())
    if not sharded:
        return
    if type(method).is_update_step is not SparseTrainingMethod.is_update_step:
        raise ValueError(
            f"{cls}: the model is sharded with FSDP2 (fully_shard), but {cls}'s topology updates rewrite each "
            "layer's values parameter and its pattern (drop / grow reorder the non-zeros across the whole "
            "parameter), while FSDP2 keeps every rank's dim-0 shard of that parameter and of its optimizer state "
            "in a fixed layout; following the new pattern would need re-sharding both at every update. Use "
            "DistributedDataParallel for dynamic sparse training; FSDP2 works with Static (a fixed mask)")
    dense = [n for n, m in eligible_layers(model, include, exclude).items()
             if any(_is_sharded(p) for p in m.parameters(recurse=False))]
    if dense:
        raise ValueError(f"{cls}: layers {dense} are dense and already sharded with FSDP2 (fully_shard); a sharded "
                         "weight cannot be swapped for a sparse one. Sparsify first (sparsekernels.sparsify(model, "
                         "sparsity)), then fully_shard, then build the optimizer and the method; or exclude those "
                         "layers")
