"""Sparse layers and the model-level swap."""

from .conv import SparseConv2d
from .distribution import layer_sparsities
from .linear import SparseLinear
from .sparsify import densify, eligible_layers, sparsify

__all__ = ["SparseLinear", "SparseConv2d", "sparsify", "densify", "eligible_layers", "layer_sparsities"]
