"""BSRLinear: ``nn.Linear`` with a block-sparse (BSR) weight; what
``SparseLinear(..., format="bsr", block_size=b)`` builds."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..formats import BSR, check_sparsity, kept_count
from ..formats.bsr import check_block_shape
from ..ops import autocast, bsr_mm
from ._sparse_weight import (CompressedWeightModule, carry_flags, check_features, check_layer_input,
                             check_loaded_pattern, check_not_meta, dense_linear, take_checkpoint_sizes)

_PATTERN = ("crow", "ccol", "t_crow", "t_ccol", "t_perm")


class BSRLinear(CompressedWeightModule):
    """``y = x W^T + b`` with W [out, in] stored as ``values [nb, b, b]`` (the trainable
    parameter) plus int32 block indices (buffers).

    Args:
        sparsity: fraction of zero blocks (and so of zero weights), in [0, 1); the kept
            blocks are chosen uniformly at random.
        block_size: b, dividing both in_features and out_features (16, 32 or 64 map onto
            tensor-core tiles on a GPU).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, sparsity: float = 0.9,
                 block_size: int = 32, device=None, dtype=None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_features("BSRLinear", in_features, out_features)
        check_not_meta("BSRLinear", device)
        sparsity = check_sparsity(sparsity)
        check_block_shape((out_features, in_features), block_size)
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        nbr, nbc = out_features // block_size, in_features // block_size
        keep = kept_count(nbr * nbc, sparsity)
        block_mask = torch.zeros(nbr * nbc, dtype=torch.bool)
        block_mask[torch.randperm(nbr * nbc, generator=generator)[:keep]] = True
        weight = torch.zeros(out_features, in_features, device=device, dtype=dtype)
        self._set_bsr(BSR.from_dense(weight, block_mask.view(nbr, nbc).to(weight.device), block_size))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def _set_bsr(self, bsr: BSR) -> None:
        self.values = nn.Parameter(bsr.values.detach().clone())
        for name, t in zip(_PATTERN, bsr.pattern()):
            self.register_buffer(name, t)

    def reset_parameters(self) -> None:
        """As nn.Linear, with the mean kept fan-in (nnz / out) in place of in_features."""
        fan_in = self.nnz / self.out_features if self.out_features else 0
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        with torch.no_grad():
            self.values.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, sparsity: float | None = None, block_mask: Tensor | None = None,
                   block_size: int = 32) -> "BSRLinear":
        """Keeps ``block_mask`` [out/b, in/b] if given, else the blocks of largest Frobenius
        norm at ``sparsity``, else every block holding a non-zero."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"BSRLinear.from_dense: expected an nn.Linear, got {type(linear).__name__}")
        if block_mask is not None and sparsity is not None:
            raise ValueError("BSRLinear.from_dense: give block_mask or sparsity, not both")
        w = linear.weight.detach()
        check_not_meta("BSRLinear.from_dense", w.device)
        check_block_shape(tuple(w.shape), block_size)
        b = block_size
        nbr, nbc = w.shape[0] // b, w.shape[1] // b
        if block_mask is None and sparsity is not None:
            norms = w.reshape(nbr, b, nbc, b).transpose(1, 2).square().sum((-1, -2)).reshape(-1)
            order = torch.sort(norms, descending=True, stable=True).indices
            block_mask = torch.zeros(nbr * nbc, dtype=torch.bool, device=w.device)
            block_mask[order[:kept_count(nbr * nbc, check_sparsity(sparsity))]] = True
            block_mask = block_mask.view(nbr, nbc)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.block_size = linear.in_features, linear.out_features, b
        layer._set_bsr(BSR.from_dense(w, block_mask, b))
        layer.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        carry_flags(linear, layer)
        return layer

    def bsr(self) -> BSR:
        return BSR(self.values, self.crow, self.ccol, self.t_crow, self.t_ccol, self.t_perm,
                   (self.out_features, self.in_features), self.block_size)

    def dense_weight(self) -> Tensor:
        """The weight [out_features, in_features] with zeros in the pruned blocks (no grad)."""
        return self.bsr().to_dense().detach()

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with this layer's weights and zeros in the pruned blocks."""
        return carry_flags(self, dense_linear(self.dense_weight(), self.bias, self.training))

    def mask(self) -> Tensor:
        return self.bsr().mask()

    def block_mask(self) -> Tensor:
        return self.bsr().block_mask()

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        total = self.in_features * self.out_features
        return 1.0 - self.nnz / total if total else 0.0

    def forward(self, input: Tensor) -> Tensor:
        check_layer_input("BSRLinear", input, self.values, self.in_features)
        y = bsr_mm(input, self.values, self.crow, self.ccol, self.t_crow, self.t_ccol, self.t_perm)
        # The bias in the product's dtype under autocast, as nn.Linear's fused bias.
        return y + autocast.cast(self.bias) if self.bias is not None else y

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        b = self.block_size
        check_loaded_pattern(self, state_dict, prefix, _PATTERN, (self.out_features // b, self.in_features // b))
        values = state_dict.get(prefix + "values")
        if isinstance(values, Tensor) and tuple(values.shape[1:]) != (b, b):
            raise ValueError(f"BSRLinear.load_state_dict ({prefix.rstrip('.') or 'root'}): values must be "
                             f"[blocks, {b}, {b}], got {tuple(values.shape)}")
        take_checkpoint_sizes(self, state_dict, prefix, _PATTERN)  # another number of blocks
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, sparsity={self.sparsity:.4f}, blocks={self.values.shape[0]}")
