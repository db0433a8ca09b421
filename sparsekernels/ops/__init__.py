"""Custom ops (``torch.ops.sparsekernels.*``) and their checked Python entry points."""

from .csr_matmul import sddmm, spmm, spmm_t

__all__ = ["spmm", "spmm_t", "sddmm"]
