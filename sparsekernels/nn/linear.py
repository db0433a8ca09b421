"""SparseLinear: a drop-in ``nn.Linear`` whose weight is stored (and trained) as CSR."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..formats import CSR, check_sparsity, random_mask
from ._conv1d import is_conv1d
from ._sparse_weight import (SparseWeightMixin, carry_flags, check_features, check_layer_input, check_not_meta,
                             dense_linear, kept_mask)


class SparseLinear(SparseWeightMixin):
    """``y = x W^T + b`` with W [out_features, in_features] sparse.

    The trainable parameter is ``values`` [nnz]: any torch optimizer works on it unchanged
    and its state is O(nnz). The pattern lives in int32 buffers (``row_ptr``, ``col_idx``
    and the transpose map ``t_row_ptr``, ``t_col_idx``, ``t_perm``). Forward, input
    gradient and weight gradient all run on the sparse kernels (``sparsekernels.ops``).

    Args:
        in_features, out_features: as ``nn.Linear``.
        bias: add a learnable bias [out_features].
        sparsity: fraction of W's entries that are zero, in [0, 1); the pattern is random
            (uniform over W) with exactly ``round((1 - sparsity) * out * in)`` non-zeros.
        format: ``"csr"`` (unstructured, this class), ``"bsr"`` (returns a
            :class:`BSRLinear` with ``block_size`` x ``block_size`` blocks) or ``"2:4"``
            (returns a :class:`Sparse24Linear`; ``mode="fixed"`` or ``"srste"``).
        generator: random generator for the pattern (and only the pattern).
    Shapes: input [..., in_features] -> output [..., out_features].
    """

    def __new__(cls, *args, format: str = "csr", block_size: int = 32, **kwargs):
        # SparseLinear(..., format="bsr", block_size=b) builds the block-sparse layer.
        if format == "bsr":
            from .bsr_linear import BSRLinear

            return BSRLinear(*args, block_size=block_size, **kwargs)
        if format == "2:4":
            from .sparse24_linear import Sparse24Linear

            kwargs.pop("sparsity", None)  # 2:4 is 50% by definition
            return Sparse24Linear(*args, **kwargs)
        if format != "csr":
            raise ValueError(f"SparseLinear: format must be 'csr', 'bsr' or '2:4', got {format!r}")
        return super().__new__(cls)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, sparsity: float = 0.9,
                 device=None, dtype=None, generator: torch.Generator | None = None, format: str = "csr",
                 block_size: int = 32) -> None:
        super().__init__()
        check_features("SparseLinear", in_features, out_features)
        check_not_meta("SparseLinear", device)
        sparsity = check_sparsity(sparsity)
        self.in_features, self.out_features = in_features, out_features
        factory = {"device": device, "dtype": dtype if dtype is not None else torch.get_default_dtype()}
        mask = random_mask((out_features, in_features), sparsity, device=device, generator=generator)
        rows, cols = mask.nonzero(as_tuple=True)
        self._init_sparse_weight(CSR.from_indices(torch.zeros(rows.numel(), **factory), rows, cols,
                                                  (out_features, in_features), check=False))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    # The dense class this layer was built from when it is not nn.Linear (transformers'
    # Conv1D): ``densify`` builds that class again. None for nn.Linear and fresh layers.
    dense_origin: type | None = None

    @classmethod
    def from_dense(cls, linear: nn.Module, *, sparsity: float | None = None, mask: Tensor | None = None) -> "SparseLinear":
        """A SparseLinear holding ``linear``'s weights at the kept positions.

        ``linear`` is an ``nn.Linear`` or a transformers ``Conv1D`` (``y = x @ W + b`` with
        its weight stored transposed, [in, out]); the layer holds W^T [out, in] in either
        case and remembers a Conv1D origin (``dense_origin``) for ``densify``.

        The kept positions are ``mask`` [out, in] if given (the nn.Linear orientation, also
        for a Conv1D), else the ``round((1 - sparsity) * out * in)`` largest-magnitude
        weights if ``sparsity`` is given, else the non-zero weights (so
        ``from_dense(s.to_dense())`` restores ``s``).
        """
        conv1d = is_conv1d(linear)
        if not conv1d and not isinstance(linear, nn.Linear):
            raise TypeError("SparseLinear.from_dense: expected an nn.Linear or a transformers Conv1D, got "
                            f"{type(linear).__name__}")
        w = linear.weight.detach()
        check_not_meta("SparseLinear.from_dense", w.device)
        if conv1d:
            if w.dim() != 2:
                raise ValueError(f"SparseLinear.from_dense: a Conv1D weight must be 2-D [in, out], got "
                                 f"{tuple(w.shape)}")
            w = w.t()  # [in, out] -> the Linear orientation [out, in]
        mask = kept_mask("SparseLinear.from_dense", w, sparsity, mask)
        layer = cls.__new__(cls)
        SparseWeightMixin.__init__(layer)
        layer.out_features, layer.in_features = w.shape
        layer._init_sparse_weight(CSR.from_dense(w, mask))
        layer.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        if conv1d:
            layer.dense_origin = type(linear)
        return carry_flags(linear, layer)

    def dense_weight(self) -> Tensor:
        """The weight [out_features, in_features] with zeros where pruned (no grad)."""
        return self.csr().to_dense().detach()

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with this layer's weights and zeros where pruned (also for a
        layer built from a Conv1D: :func:`sparsekernels.densify` restores that class)."""
        return carry_flags(self, dense_linear(self.dense_weight(), self.bias, self.training))

    def mask(self) -> Tensor:
        """Boolean [out_features, in_features] pattern."""
        return self.csr().mask()

    def forward(self, input: Tensor) -> Tensor:
        x = check_layer_input("SparseLinear", input, self.values, self.in_features)
        # The bias goes into the product (cast with it under autocast, as nn.Linear's fused
        # bias): the CPU kernel adds it as it writes y. A separate y.add_(bias) read and
        # wrote all of y once more (0.9 ms of a ~6 ms forward at SparseProp's 2048 x 768 ->
        # 3072, 98%), and its backward summed dy in a pass of its own.
        return self._matmul(x, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, sparsity={self.sparsity:.4f}, nnz={self.nnz}")
