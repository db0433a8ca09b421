"""Plain-PyTorch definitions of every op: the ground truth the tests compare against.

Everything here goes through a dense ``[out, in]`` weight built from the CSR pattern, so
it is obviously right and differentiable by ordinary autograd (used for ``gradcheck``
comparisons), not fast.

Shared argument convention (the same for every CSR op):
    values     [nnz]       float      non-zeros of W [out, in], row-major order
    row_ptr    [out + 1]   int32      CSR row pointers of W
    col_idx    [nnz]       int32      column of each non-zero
    t_row_ptr  [in + 1]    int32      CSR row pointers of W^T (the transpose map)
    t_col_idx  [nnz]       int32      row of W for each non-zero of W^T
    t_perm     [nnz]       int32/64   position in ``values`` of each non-zero of W^T
"""

from __future__ import annotations

import torch
from torch import Tensor


def csr_rows(row_ptr: Tensor, nnz: int | None = None) -> Tensor:
    """Row index (int64) of every non-zero, from ``row_ptr`` [rows + 1]; passing ``nnz``
    (known from the shapes) spares a device sync on the GPU."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=row_ptr.device), counts, output_size=nnz)


def rows_strictly_increasing(row_ptr: Tensor, col_idx: Tensor) -> bool:
    """Whether ``col_idx`` increases strictly within every row of ``row_ptr`` (a valid
    [rows + 1] row pointer): each row's columns sorted, each position once. O(nnz), one
    device sync."""
    nnz = col_idx.shape[0]
    if nnz < 2:
        return True
    increasing = col_idx[1:] > col_idx[:-1]
    # A row's first entry need not exceed the previous row's last one.
    starts = row_ptr[1:-1].long()
    starts = starts[(starts > 0) & (starts < nnz)]
    increasing[starts - 1] = True
    return bool(increasing.all())


def meta_columns(meta: Tensor) -> Tensor:
    """Column (int64) of every stored value of a 2:4 matrix, [out, in/2], from its metadata
    ``meta [out, in/4]`` (uint8, kept positions i0 | i1 << 2 of each group of 4)."""
    m = meta.long()
    base = torch.arange(meta.shape[1], device=meta.device) * 4
    # Explicit sizes: -1 is ambiguous for a matrix with no rows.
    return torch.stack([base + (m & 3), base + (m >> 2)], -1).reshape(meta.shape[0], 2 * meta.shape[1])


def csr_to_dense(values: Tensor, row_ptr: Tensor, col_idx: Tensor, n_cols: int) -> Tensor:
    """Dense ``[rows, n_cols]`` matrix of a CSR matrix (differentiable in ``values``)."""
    n_rows = row_ptr.numel() - 1
    # Each entry's flat position: its row's start repeated over the row, plus its column
    # (one pass fewer than rows * n_cols + cols). Positions are distinct, so index_copy_
    # (half the time of index_put_ on the CPU) places the values; in place on a fresh zero
    # tensor, still differentiable in values, without copying the dense matrix again.
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    starts = torch.arange(n_rows, device=row_ptr.device).mul_(n_cols)
    flat = torch.repeat_interleave(starts, counts, output_size=col_idx.shape[0]).add_(col_idx)
    return values.new_zeros(n_rows * n_cols).index_copy_(0, flat, values).view(n_rows, n_cols)


def spmm(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
         t_col_idx: Tensor, t_perm: Tensor) -> Tensor:
    """``y[..., out] = x[..., in] @ W^T``."""
    w = csr_to_dense(values, row_ptr, col_idx, t_row_ptr.numel() - 1)
    return x @ w.t()


def spmm_t(dy: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
           t_col_idx: Tensor, t_perm: Tensor) -> Tensor:
    """``dx[..., in] = dy[..., out] @ W``."""
    w = csr_to_dense(values, row_ptr, col_idx, t_row_ptr.numel() - 1)
    return dy @ w


def sddmm(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
          t_col_idx: Tensor, t_perm: Tensor) -> Tensor:
    """``dvalues[nnz] = (dy^T @ x)`` at W's pattern, batch dimensions summed.

    dy: [..., out], x: [..., in] with equal leading dimensions."""
    rows = dy.shape[:-1].numel()  # not reshape(-1, n): ambiguous when n == 0
    dy2 = dy.reshape(rows, dy.shape[-1])
    x2 = x.reshape(rows, x.shape[-1])
    full = dy2.t() @ x2
    return full[csr_rows(row_ptr), col_idx.long()]


# --------------------------------------------------------------------------- 2:4
# A 2:4 weight W [out, in]: values [out, in/2] (its kept weights, two per group of 4 along
# a row, in order) and meta [out, in/4] (uint8, their positions i0 | i1 << 2).
def sparse24_to_dense(values: Tensor, meta: Tensor) -> Tensor:
    """Dense ``[out, in]`` weight of a 2:4 matrix (differentiable in ``values``)."""
    return values.new_zeros(values.shape[0], 4 * meta.shape[1]).scatter(1, meta_columns(meta), values)


def sparse24_mm(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y[..., out] = x[..., in] @ W^T (+ bias)``."""
    return torch.nn.functional.linear(x, sparse24_to_dense(values, meta), bias)


def sparse24_mm_t(dy: Tensor, values: Tensor, meta: Tensor) -> Tensor:
    """``dx[..., in] = dy[..., out] @ W``."""
    return dy @ sparse24_to_dense(values, meta)


def sparse24_sddmm(dy: Tensor, x: Tensor, meta: Tensor) -> Tensor:
    """``dvalues[out, in/2] = (dy^T @ x)`` at W's kept positions, laid out as ``values``,
    batch dimensions summed. dy: [..., out], x: [..., in] with equal leading dimensions."""
    rows = dy.shape[:-1].numel()  # not reshape(-1, n): ambiguous when n == 0
    full = dy.reshape(rows, dy.shape[-1]).t() @ x.reshape(rows, x.shape[-1])
    return full.gather(1, meta_columns(meta))
