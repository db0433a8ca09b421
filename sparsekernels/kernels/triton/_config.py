"""Autotuning configurations: the interpreter accepts exactly one."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import interpreting


# "first": the first GPU config of each kernel only (bench/gpu_check.sh sets it for its
# tests, which check results, not speed: autotuning every config of every kernel, dtype
# and block size there would spend the GPU machine's minutes compiling). Read at import.
CONFIGS_ENV_VAR = "SPARSEKERNELS_TRITON_CONFIGS"


def configs(options: list[dict], interpreted: dict, num_warps: int = 4) -> list[triton.Config]:
    """``options`` on a GPU (``num_warps`` / ``num_stages`` keys become the launch
    settings; Triton's autotuner times them on the first call per key and skips one that
    does not fit the GPU's shared memory), the single ``interpreted`` config under
    TRITON_INTERPRET=1."""
    if interpreting():
        return [triton.Config(interpreted, num_warps=1)]
    if os.environ.get(CONFIGS_ENV_VAR) == "first":
        options = options[:1]
    out = []
    for o in (dict(o) for o in options):
        out.append(triton.Config(o, num_warps=o.pop("num_warps", num_warps), num_stages=o.pop("num_stages", 3)))
    return out


def acc_type(dtype: torch.dtype):
    """Accumulator type: fp64 for fp64 inputs (gradcheck), fp32 for everything else."""
    return tl.float64 if dtype == torch.float64 else tl.float32
