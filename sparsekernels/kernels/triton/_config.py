"""Autotuning configurations: the interpreter accepts exactly one."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting


def configs(options: list[dict], interpreted: dict, num_warps: int = 4) -> list[triton.Config]:
    """``options`` on a GPU, the single ``interpreted`` config under TRITON_INTERPRET=1."""
    if interpreting():
        return [triton.Config(interpreted, num_warps=1)]
    return [triton.Config(o, num_warps=o.pop("num_warps", num_warps)) for o in (dict(o) for o in options)]


def acc_type(dtype: torch.dtype):
    """Accumulator type: fp64 for fp64 inputs (gradcheck), fp32 for everything else."""
    return tl.float64 if dtype == torch.float64 else tl.float32
