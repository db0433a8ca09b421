"""Custom ops (``torch.ops.sparsekernels.*``) and their checked Python entry points."""

from .bsr_matmul import bsr_mm, bsr_mm_t, bsr_sddmm
from .csr_matmul import sddmm, spmm, spmm_t
from .sparse24 import sparse24_mm, srste_linear
from .topk_grow import topk_grow
from . import autocast

autocast.register_rules()  # the ops above are defined now

__all__ = ["spmm", "spmm_t", "sddmm", "topk_grow", "bsr_mm", "bsr_mm_t", "bsr_sddmm", "sparse24_mm",
           "srste_linear"]
