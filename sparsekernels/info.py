"""What this installation can run: compiled kernels, backends, the choice per device."""

from __future__ import annotations

import os
import platform

import torch

from . import _extension, backends


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
        "cuda_available": torch.cuda.is_available(),
        "requested_backend": backends.get_backend(),
        "compiled_with_cuda": _extension.compiled_with_cuda(),
        "triton_interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "available": {"cpu": backends.available("cpu"), "cuda": backends.available("cuda")},
        "chosen": {},
    }
    from .ops.sparse24 import GPU_MIN_ROWS

    info["cpu_dense_from_density"] = (f"auto runs CSR products as a dense matmul at density >= "
                                      f"{backends.CPU_DENSE_FROM_DENSITY} (measured crossover)")

    info["sparse24_gpu_policy"] = (f"2:4 GEMM through torch semi-structured tensors for fp16/bf16 with >= "
                                   f"{GPU_MIN_ROWS} rows; dense cuBLAS otherwise (unverified on a GPU)")
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
