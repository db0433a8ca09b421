"""Sparse weight formats and their conversions to and from dense + mask."""

from .bsr import BSR
from .csr import CSR, build_transpose
from .sparse24 import Sparse24, compress_24, is_24, prune_24, prune_24_transposable
from .masks import check_sparsity, kept_count, magnitude_mask, random_mask

__all__ = ["BSR", "CSR", "Sparse24", "compress_24", "is_24", "prune_24", "prune_24_transposable", "build_transpose", "check_sparsity", "kept_count", "magnitude_mask", "random_mask"]
