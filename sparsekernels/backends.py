"""Backend choice for every op: by device and dtype, overridable.

Backends: ``"cpu"`` (compiled C++ kernels), ``"cuda"`` (compiled CUDA kernels),
``"triton"`` and ``"reference"`` (plain PyTorch, ``sparsekernels.reference``).
``"auto"`` picks the fastest one available for the tensors at hand.
Override with :func:`set_backend` / :func:`use_backend` or the environment variable
``SPARSEKERNELS_BACKEND``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from . import _extension

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
ENV_VAR = "SPARSEKERNELS_BACKEND"
_override: str | None = None


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: str | None) -> None:
    """Forces every op onto backend ``name`` (one of ``BACKENDS``); ``None`` or ``"auto"``
    restores the automatic choice."""
    global _override
    _override = None if name is None else _check_name(name)


def get_backend() -> str:
    """The requested backend: the :func:`set_backend` override, else the environment
    variable, else ``"auto"``."""
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR)
    return _check_name(env) if env else "auto"


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def available(device_type: str) -> list[str]:
    """Backends that can run ops on tensors of ``device_type`` in this build."""
    names = []
    if device_type == "cpu" and _extension.compiled():
        names.append("cpu")
    names.append("reference")
    return names


def resolve(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs ``op`` for tensors on ``device`` of ``dtype``."""
    requested = get_backend()
    if requested == "auto":
        # Measured on this project's CPU machine: the C++ kernels beat dense matmul from
        # 50% sparsity on and the reference (a dense matmul) by more; see bench/results.
        return available(device.type)[0]
    if requested == "reference":
        return "reference"
    if requested == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend 'cpu' was requested but the tensors are on {device}")
        _extension.require(f"{op} on backend 'cpu'")
        return "cpu"
    raise RuntimeError(
        f"{op}: backend {requested!r} is not available in this build (available for "
        f"{device.type}: {available(device.type)}); unset it with sparsekernels.set_backend(None)"
    )
