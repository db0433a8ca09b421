"""Custom ops (``torch.ops.sparsekernels.*``) and their checked Python entry points."""

from .csr_matmul import sddmm, spmm, spmm_t
from .topk_grow import topk_grow

__all__ = ["spmm", "spmm_t", "sddmm", "topk_grow"]
