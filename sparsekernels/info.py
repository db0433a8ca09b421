"""What this installation can run: compiled kernels, backends, the choice per device."""

from __future__ import annotations

import os
import platform

import torch

from . import _extension, backends


def _cusparselt() -> str | None:
    """cuSPARSELt's version when torch can use it for its 2:4 GEMMs (a GPU is there and
    the library loads), else None."""
    backend = getattr(torch.backends, "cusparselt", None)
    try:
        if backend is None or not torch.cuda.is_available() or not backend.is_available():
            return None
        return str(backend.version())
    except (RuntimeError, AttributeError):
        return None


def collect() -> dict:
    """A dict describing the build and the backend choice (printed by ``sparsekernels info``)."""
    info = {
        "sparsekernels": __import__("sparsekernels").__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "compiled_extension": _extension.compiled(),
        "compiled_ops": _extension.compiled_ops(),
        "load_error": _extension.LOAD_ERROR,
        "cpu_avx512_path": _extension.cpu_has_avx512(),
        "cpu_simd_path": _extension.cpu_simd_level(),
        "cpu_bf16_step": _extension.cpu_bf16_step(),
        "cuda_available": torch.cuda.is_available(),
        "requested_backend": backends.get_backend(),
        "compiled_with_cuda": _extension.compiled_with_cuda(),
        "triton_interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
        # Backends for CUDA tensors only where a GPU is: without one nothing runs there.
        "available": {"cpu": backends.available("cpu"),
                      "cuda": backends.available("cuda") if torch.cuda.is_available() else []},
        "chosen": {},
    }
    from .ops.sparse24 import GPU_MIN_ROWS, GPU_SMALL_ROWS

    measuring = "on" if backends.measuring_enabled() else f"off ({backends.MEASURE_ENV_VAR}=0)"
    info["dispatch_policy"] = (
        f"auto: products of >= {backends.MEASURE_MIN_FLOPS:.0f} dense-equivalent FLOPs are measured once per "
        f"(op, device, dtype, batch bucket, shape, density) on every available backend, checked against the "
        f"reference, and the fastest kept [measuring {measuring}]; smaller ones take the first available "
        f"backend (CPU: the C++ kernels; GPU: CUDA, then Triton)")
    info["measured"] = backends.measured()
    info["sparse24_gpu_policy"] = (f"forward of <= {GPU_SMALL_ROWS} rows: our CUDA kernel on the compressed form "
                                   "(any dtype; unverified on a GPU); 2:4 GEMM (bias fused) through torch "
                                   f"semi-structured tensors for fp16/bf16 with >= {GPU_MIN_ROWS} rows; each "
                                   "measured against dense cuBLAS per shape; dense otherwise, with a warning once "
                                   "per reason; no fused activation (torch's 2:4 GEMMs take none)")
    info["cusparselt"] = _cusparselt()
    try:
        import triton  # noqa: F401

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    for dev in ("cpu", "cuda"):
        if dev == "cuda" and not torch.cuda.is_available():
            continue
        for dtype in (torch.float32, torch.bfloat16):
            try:
                chosen = backends.resolve("spmm", torch.device(dev), dtype)
            except (RuntimeError, ValueError) as exc:
                chosen = f"error: {exc}"
            info["chosen"][f"{dev}/{str(dtype).replace('torch.', '')}"] = chosen
    return info
