"""Topology primitives used by the sparse-training methods: which weights to drop, which
positions to grow, and rebuilding a layer's CSR (with its optimizer state) afterwards.
No dense weight or dense gradient is formed for a sparse layer."""

from .drop import drop_smallest
from .grow import grow_all, grow_by_gradient, grow_random, inactive_count
from .optimizer_state import remap_optimizer_state
from .update import LayerUpdate, grow_to_dense, prune_to, update_layer

__all__ = ["drop_smallest", "grow_by_gradient", "grow_random", "grow_all", "inactive_count",
           "remap_optimizer_state", "update_layer", "LayerUpdate", "prune_to", "grow_to_dense"]
