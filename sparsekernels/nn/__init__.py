"""Sparse layers and the model-level swap."""

from .bsr_linear import BSRLinear
from .conv import SparseConv2d
from .distribution import layer_sparsities
from .linear import SparseLinear
from .sparse24_linear import Sparse24Linear
from .sparsify import densify, eligible_layers, left_dense_layers, sparse_class_for, sparsify
from .tracing import SparseTracer, symbolic_trace

__all__ = ["BSRLinear", "Sparse24Linear", "SparseLinear", "SparseConv2d", "sparsify", "densify", "eligible_layers", "layer_sparsities",
           "left_dense_layers", "sparse_class_for", "SparseTracer", "symbolic_trace"]
