"""The pruned-weight database SPDY's search scores its candidate plans with.

SPDY (Frantar & Alistarh, "SPDY: Accurate Pruning with Speedup Guarantees", ICML 2022)
prunes every layer to every sparsity level once, independently of the other layers (each
layer sees the DENSE model's inputs), and evaluates a candidate plan by "stitching" the
stored layers into the model. Here a (layer, level) entry is computed on first use and
kept, least recently used first out, within ``cache_bytes``:

* ``"magnitude"``: the smallest |w| of the layer removed, the same weights
  :func:`sparsekernels.oneshot.magnitude_prune` removes (stable ranking, ties to the lower
  index); the ranking is computed once per layer and cut at each level;
* ``"sparsegpt"``: SparseGPT (Frantar & Alistarh, ICML 2023) through
  :func:`sparsekernels.oneshot.prune_matrix`, with the layer Hessian H = 2/N · X Xᵀ
  collected once per layer from the calibration batches through the dense model
  (:func:`sparsekernels.oneshot.collect_hessian`).

Weights are returned as dense tensors of the layer's weight shape with zeros where pruned
(the calibration loss only needs the numbers; the real sparse layers are built by
:meth:`SPDYResult.apply`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from ..formats import kept_count
from ..nn._conv1d import is_conv1d
from ..oneshot import collect_hessian, prune_matrix
from ..oneshot.calibration import weight_matrix
from ..oneshot.sparsegpt import BLOCK_SIZE

METHODS = ("sparsegpt", "magnitude")
DEFAULT_CACHE_BYTES = 4 << 30


def matrix_to_weight(module: nn.Module, W: Tensor) -> Tensor:
    """The weight tensor of ``module`` holding the matrix ``W`` [out, k] (the inverse of
    ``oneshot.calibration.weight_matrix``: reshaped for a convolution, transposed for a
    transformers Conv1D)."""
    return W.t().contiguous() if is_conv1d(module) else W.reshape(module.weight.shape)


class PrunedWeights:
    """(layer name, sparsity) -> the layer's pruned weight, computed on first use.

    Args:
        model: the dense model (only read; must stay dense while this is used).
        layers: name -> module of the prunable layers.
        batches: the calibration batches (``"sparsegpt"`` only).
        method: ``"sparsegpt"`` or ``"magnitude"``.
        damp, block_size: SparseGPT's dampening and block size.
        cache_bytes: memory kept for computed weights (oldest dropped first).
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], batches: list, method: str, *,
                 damp: float = 0.01, block_size: int = BLOCK_SIZE, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if method not in METHODS:
            raise ValueError(f"spdy: method must be one of {METHODS}, got {method!r}")
        self.model, self.layers, self.batches, self.method = model, layers, batches, method
        self.damp, self.block_size, self.cache_bytes = damp, block_size, cache_bytes
        self._cache: OrderedDict[tuple[str, float], Tensor] = OrderedDict()
        self._held = 0
        self._ranking: dict[str, Tensor] = {}
        self._hessian: dict[str, Tensor] = {}
        self.computed = 0

    def weight(self, name: str, sparsity: float) -> Tensor:
        """The weight of layer ``name`` pruned to ``sparsity`` (dense layout, zeros where pruned)."""
        key = (name, float(sparsity))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        module = self.layers[name]
        W = self._magnitude(name, module, sparsity) if self.method == "magnitude" else self._sparsegpt(name, module, sparsity)
        w = matrix_to_weight(module, W).to(module.weight.dtype)
        self.computed += 1
        self._cache[key] = w
        self._held += w.numel() * w.element_size()
        while self._held > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._held -= old.numel() * old.element_size()
        return w

    def _magnitude(self, name: str, module: nn.Module, sparsity: float) -> Tensor:
        W = weight_matrix(module)
        order = self._ranking.get(name)
        if order is None:
            order = self._ranking[name] = torch.sort(W.abs().reshape(-1), stable=True).indices
        pruned = order[:W.numel() - kept_count(W.numel(), sparsity)]
        return W.reshape(-1).index_fill(0, pruned, 0).view(W.shape)

    def _sparsegpt(self, name: str, module: nn.Module, sparsity: float) -> Tensor:
        H = self._hessian.get(name)
        if H is None:
            H = self._hessian[name] = collect_hessian(self.model, module, self.batches)[0]
        return prune_matrix(weight_matrix(module), H, "sparsegpt", sparsity, damp=self.damp,
                            block_size=self.block_size)[0]
