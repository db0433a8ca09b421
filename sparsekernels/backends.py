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


def _triton_usable(device_type: str) -> bool:
    from .kernels import triton as triton_kernels

    if not triton_kernels.available():
        return False
    # On the CPU Triton only runs in its interpreter (how CI tests the kernels).
    return device_type == "cuda" or (device_type == "cpu" and triton_kernels.interpreting())


def available(device_type: str) -> list[str]:
    """Backends that can run ops on tensors of ``device_type`` in this build, in the order
    ``"auto"`` prefers them."""
    names = []
    if device_type == "cpu" and _extension.compiled():
        names.append("cpu")
    if device_type == "cuda" and _extension.compiled_with_cuda():
        names.append("cuda")
    if _triton_usable(device_type):
        names.append("triton")
    names.append("reference")
    return names


# Density from which "auto" runs a CSR product as a dense matmul on the CPU. Measured in
# bench/results/csr-linear-cpu-*.json: at 50% sparsity our forward is 1.0-1.2x dense but the
# full step 0.8-1.0x; denser layers (e.g. the small layers ERK leaves dense) only lose.
CPU_DENSE_FROM_DENSITY = 0.6


def resolve(op: str, device: torch.device, dtype: torch.dtype, density: float | None = None) -> str:
    """The backend that runs ``op`` for tensors on ``device`` of ``dtype``; ``density``
    (nnz / (out * in)) lets ``"auto"`` send nearly dense weights to a dense matmul."""
    requested = get_backend()
    choices = available(device.type)
    if requested == "auto":
        # CPU: the C++ kernels, or a dense matmul (the reference) at or above
        # CPU_DENSE_FROM_DENSITY; GPU: our CUDA kernels, then Triton; the reference last.
        # The Triton interpreter is never chosen automatically: it exists for testing.
        auto = [c for c in choices if not (c == "triton" and device.type == "cpu")]
        if device.type == "cpu" and density is not None and density >= CPU_DENSE_FROM_DENSITY:
            return "reference"
        return auto[0]
    if requested in choices:
        return requested
    if requested in ("cpu", "cuda") and requested != device.type:
        raise ValueError(f"{op}: backend {requested!r} was requested but the tensors are on {device}")
    if requested in ("cpu", "cuda") and not _extension.compiled():
        _extension.require(f"{op} on backend {requested!r}")
    raise RuntimeError(
        f"{op}: backend {requested!r} is not available for {device.type} tensors in this build (available: "
        f"{choices}; 'triton' on the CPU needs TRITON_INTERPRET=1, 'cuda' an extension built with CUDA); "
        "unset it with sparsekernels.set_backend(None)"
    )
