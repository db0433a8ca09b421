"""Triton kernels. They run on NVIDIA GPUs, and on the CPU under ``TRITON_INTERPRET=1``
(how CI tests them: small shapes, fp32/fp16 — bf16 is not exact in the interpreter)."""

from __future__ import annotations

import functools
import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (must be set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache  # whether triton imports does not change within a process
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
