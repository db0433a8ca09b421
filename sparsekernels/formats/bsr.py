"""BSR (block-sparse rows) format for a weight W [out, in] with square b x b blocks.

``values[nb, b, b]`` holds the non-zero blocks in block-row-major order, ``crow[out/b + 1]``
and ``ccol[nb]`` (int32) index them, and the transpose map ``t_crow[in/b + 1]``,
``t_ccol[nb]`` (block row of each W^T block) and ``t_perm[nb]`` (its position in
``values``) serves the input-gradient product. Tile-structured sparsity runs on dense
b x b matmuls (tensor cores on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import check_int
from ..reference import csr_rows
from .csr import build_transpose, row_ptr_from_rows
from .masks import check_mask

# Block sizes the Triton kernels take (tl.dot tiles: powers of two, at least 16); other
# sizes run on the reference backend.
BLOCK_SIZES = (16, 32, 64)


def check_block_size(block_size: object, owner: str = "") -> int:
    """A BSR block size: a positive int."""
    return check_int("block_size", block_size, owner)


def check_block_shape(shape: tuple[int, int], block_size: int) -> None:
    check_block_size(block_size)
    out_f, in_f = shape
    if out_f % block_size or in_f % block_size:
        raise ValueError(f"BSR: the weight shape {tuple(shape)} must be divisible by block_size {block_size} "
                         "in both dimensions")


@dataclass
class BSR:
    """A block-sparse ``[out, in]`` matrix with its transpose map (see module docstring)."""

    values: Tensor
    crow: Tensor
    ccol: Tensor
    t_crow: Tensor
    t_ccol: Tensor
    t_perm: Tensor
    shape: tuple[int, int]
    block_size: int

    @classmethod
    def from_dense(cls, weight: Tensor, block_mask: Tensor | None = None, block_size: int = 32) -> "BSR":
        """BSR of ``weight`` keeping the blocks where ``block_mask`` [out/b, in/b] is true
        (default: blocks with any non-zero). Kept blocks are copied whole, so
        ``to_dense()`` equals ``weight`` times the expanded block mask exactly."""
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError("BSR.from_dense: weight must be a 2-D tensor [out, in]")
        if not weight.dtype.is_floating_point:
            raise TypeError(f"BSR.from_dense: weight must be a floating dtype, got {weight.dtype}")
        check_block_shape(tuple(weight.shape), block_size)
        b = block_size
        nbr, nbc = weight.shape[0] // b, weight.shape[1] // b
        blocks = weight.reshape(nbr, b, nbc, b).transpose(1, 2)          # [nbr, nbc, b, b]
        if block_mask is None:
            block_mask = blocks.ne(0).any(-1).any(-1)
        block_mask = check_mask("BSR.from_dense", block_mask, (nbr, nbc), "block_mask").to(weight.device)
        rows, cols = block_mask.nonzero(as_tuple=True)
        crow = row_ptr_from_rows(rows, nbr)
        ccol = cols.to(torch.int32)
        t_crow, t_ccol, t_perm = build_transpose(crow, ccol, nbc)
        return cls(blocks[rows, cols].contiguous(), crow, ccol, t_crow, t_ccol, t_perm, tuple(weight.shape), b)

    @property
    def nnz_blocks(self) -> int:
        return self.values.shape[0]

    @property
    def density(self) -> float:
        total = self.shape[0] * self.shape[1]
        return self.nnz_blocks * self.block_size**2 / total if total else 1.0

    def pattern(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(crow, ccol, t_crow, t_ccol, t_perm): the index arguments of the BSR ops."""
        return self.crow, self.ccol, self.t_crow, self.t_ccol, self.t_perm

    def block_mask(self) -> Tensor:
        b = self.block_size
        m = torch.zeros(self.shape[0] // b, self.shape[1] // b, dtype=torch.bool, device=self.values.device)
        rows = csr_rows(self.crow)
        m[rows, self.ccol.long()] = True
        return m

    def mask(self) -> Tensor:
        """Element-wise boolean [out, in] pattern."""
        b = self.block_size
        return self.block_mask().repeat_interleave(b, 0).repeat_interleave(b, 1)

    def to_dense(self) -> Tensor:
        b = self.block_size
        nbr, nbc = self.shape[0] // b, self.shape[1] // b
        dense = self.values.new_zeros(nbr, nbc, b, b)
        rows = csr_rows(self.crow)
        dense[rows, self.ccol.long()] = self.values.detach()
        return dense.transpose(1, 2).reshape(self.shape)
