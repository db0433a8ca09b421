"""Loads the compiled kernels (``sparsekernels._C``) if they were built.

The package works without them (reference backend); ``sparsekernels info`` reports
what is available and why something is missing.
"""

from __future__ import annotations

import torch

try:  # the import registers torch.ops.sparsekernels_C.* (TORCH_LIBRARY in csrc/ops.cpp)
    from . import _C  # noqa: F401

    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def _register_fakes() -> None:
    """Fake (shape-only) kernels for the compiled ops Python calls directly, outside a
    custom op of its own, so torch.compile / torch.export can trace those calls: the 2:4
    prune + compress that SR-STE's mask update runs in its forward (without it a
    ``fullgraph=True`` compile of a training SR-STE layer failed)."""

    @torch.library.register_fake("sparsekernels_C::sparse24_compress")
    def _(weight, transposable):
        n, k = weight.shape
        return (weight.new_empty((n, k // 2)), weight.new_empty((n, k // 4), dtype=torch.uint8),
                weight.new_empty((n, k), dtype=torch.bool))


if LOAD_ERROR is None and hasattr(torch.ops.sparsekernels_C, "sparse24_compress"):
    _register_fakes()


def compiled() -> bool:
    """True when the C++ extension is loaded."""
    return LOAD_ERROR is None


def compiled_ops() -> list[str]:
    """Names of the ops the compiled library registered (empty when not loaded)."""
    if not compiled():
        return []
    try:  # every schema the library defined, read from the dispatcher
        names = {n.split("::", 1)[1].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names()
                 if n.startswith("sparsekernels_C::")}
    except (AttributeError, RuntimeError):
        names = {n for n in ("spmm", "spmm_t", "sddmm", "topk_grow") if hasattr(torch.ops.sparsekernels_C, n)}
    return sorted(names)


def compiled_with_cuda() -> bool:
    """Whether the extension holds the CUDA kernels (built where nvcc and a CUDA torch were found)."""
    return compiled() and bool(torch.ops.sparsekernels_C.built_with_cuda())


def cpu_has_avx512() -> bool:
    """Whether the compiled CPU kernels run their AVX-512 path on this machine."""
    return compiled() and bool(torch.ops.sparsekernels_C.cpu_has_avx512())


def cpu_simd_level() -> str:
    """The instruction set the compiled fp32 CPU kernels run here: "avx512", "avx2" (AVX2 +
    FMA) or "generic" (portable loops); "" without the extension."""
    return str(torch.ops.sparsekernels_C.cpu_simd_level()) if compiled() else ""


def cpu_bf16_step() -> str:
    """How the compiled CPU 2:4 kernel multiplies decode-sized bf16 batches here: "amx"
    (AMX-BF16 tiles), "dot" (AVX512-BF16 dot products) or "widen" (fp32 FMAs); "" without
    the extension."""
    return str(torch.ops.sparsekernels_C.cpu_bf16_step()) if compiled() else ""


def release_workspace() -> None:
    """Frees the calling thread's cached kernel scratch buffers (packed input panels)."""
    if compiled():
        torch.ops.sparsekernels_C.release_workspace()


def require(what: str) -> None:
    """Raises an actionable error when the compiled kernels are needed but missing."""
    if not compiled():
        raise RuntimeError(
            f"{what} needs the compiled sparsekernels extension, which did not load ({LOAD_ERROR}). "
            "Build it with `pip install --no-build-isolation -e .` (or `make build`), "
            "or choose the reference backend: sparsekernels.set_backend('reference')."
        )
