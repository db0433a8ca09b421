"""CSR format for an unstructured sparse weight W [out, in], with the transpose map.

``values[nnz]`` (the trainable numbers), ``row_ptr[out+1]`` and ``col_idx[nnz]`` (int32)
in row-major order, plus W^T's CSR for the input-gradient product: ``t_row_ptr[in+1]``,
``t_col_idx[nnz]`` (int32, the row of W of each entry) and ``t_perm[nnz]`` (int32,
position of each W^T entry in ``values``). The transpose map depends only on the pattern,
so it is built when the pattern changes, never per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import reference


def _rows_of(row_ptr: Tensor) -> Tensor:
    return reference.csr_rows(row_ptr)


def build_transpose(row_ptr: Tensor, col_idx: Tensor, n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """W^T's CSR for W = (row_ptr [rows+1], col_idx [nnz]) with ``n_cols`` columns.

    Returns ``(t_row_ptr [n_cols+1], t_col_idx [nnz], t_perm [nnz])``, all int32; entries
    of each W^T row are in increasing W-row order. No dense round trip. On the CPU with the
    compiled extension a counting sort, O(nnz + rows + cols) (column counts, exclusive
    prefix sum, stable placement); elsewhere a stable sort of the column indices (a radix
    sort on the GPU; O(nnz log nnz) on a CPU without the extension).
    """
    from .. import _extension

    if (row_ptr.device.type == "cpu" and _extension.compiled() and row_ptr.dtype == torch.int32
            and col_idx.dtype == torch.int32 and hasattr(torch.ops.sparsekernels_C, "csr_transpose")):
        return torch.ops.sparsekernels_C.csr_transpose(row_ptr, col_idx, int(n_cols))
    return _build_transpose_sorted(row_ptr, col_idx, n_cols)


def _build_transpose_sorted(row_ptr: Tensor, col_idx: Tensor, n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`build_transpose` with torch ops alone (GPU, or no compiled extension)."""
    rows = _rows_of(row_ptr)
    cols = col_idx.long()
    # Sort by (column, row): a stable sort on the column keeps rows ascending, since the
    # entries come in row-major order.
    perm = torch.sort(cols, stable=True).indices
    t_row_ptr = torch.zeros(n_cols + 1, dtype=torch.int32, device=row_ptr.device)
    if cols.numel():
        t_row_ptr[1:] = torch.bincount(cols, minlength=n_cols).cumsum(0)
    return t_row_ptr, rows[perm].to(torch.int32), perm.to(torch.int32)


def kept_pattern(row_ptr: Tensor, col_idx: Tensor, kept_idx: Tensor) -> tuple[Tensor, Tensor]:
    """The CSR pattern (row_ptr, col_idx; int32) of the entries ``kept_idx`` (ascending
    int64 indices into ``col_idx``) of the pattern (row_ptr, col_idx): the kept entries
    stay in row-major order, so it is a gather, and each row's start is the number of
    kept entries before it. O(nnz + rows log nnz), no keys, no sort."""
    return (torch.searchsorted(kept_idx, row_ptr.long()).to(torch.int32),
            col_idx[kept_idx].to(torch.int32))


def row_ptr_from_rows(rows: Tensor, n_rows: int) -> Tensor:
    """CSR row pointers (int32, [n_rows+1]) from the sorted row index of every non-zero."""
    row_ptr = torch.zeros(n_rows + 1, dtype=torch.int32, device=rows.device)
    if rows.numel():
        row_ptr[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return row_ptr


@dataclass
class CSR:
    """A sparse ``[out, in]`` matrix in CSR form with its transpose map.

    Build with :meth:`from_dense`; the tensors are plain attributes so a module can
    register them as its parameter (``values``) and buffers (the rest).
    """

    values: Tensor
    row_ptr: Tensor
    col_idx: Tensor
    t_row_ptr: Tensor
    t_col_idx: Tensor
    t_perm: Tensor
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor | None = None) -> "CSR":
        """CSR of ``weight`` [out, in] keeping the positions where ``mask`` is true (default:
        ``weight != 0``). Values inside the mask are kept even when zero, so
        ``from_dense(w, m).to_dense() == w * m`` and ``.mask() == m`` exactly."""
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"CSR.from_dense: weight must be a 2-D tensor [out, in], got "
                             f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
        if not weight.dtype.is_floating_point:
            raise TypeError(f"CSR.from_dense: weight must be a floating dtype, got {weight.dtype}")
        if mask is None:
            mask = weight != 0
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"CSR.from_dense: mask must be a tensor of shape {tuple(weight.shape)}, got "
                             f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
        if mask.dtype != torch.bool:
            if mask.dtype.is_floating_point or mask.dtype.is_complex or not ((mask == 0) | (mask == 1)).all():
                raise ValueError("CSR.from_dense: mask must be boolean (or integer 0/1)")
            mask = mask.bool()
        mask = mask.to(weight.device)
        return cls.from_indices(weight[mask], *mask.nonzero(as_tuple=True), shape=tuple(weight.shape))

    @classmethod
    def from_indices(cls, values: Tensor, rows: Tensor, cols: Tensor, shape: tuple[int, int]) -> "CSR":
        """CSR from COO entries given in row-major order (``rows`` sorted, ``cols`` sorted
        within each row), e.g. from ``mask.nonzero(as_tuple=True)``."""
        n_rows, n_cols = int(shape[0]), int(shape[1])
        if n_rows * n_cols >= 2**31 and values.numel() >= 2**31:
            raise ValueError("CSR: nnz must fit int32 indices")
        row_ptr = row_ptr_from_rows(rows.long(), n_rows)
        col_idx = cols.to(torch.int32)
        t_row_ptr, t_col_idx, t_perm = build_transpose(row_ptr, col_idx, n_cols)
        return cls(values.contiguous(), row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, (n_rows, n_cols))

    @classmethod
    def from_pattern(cls, values: Tensor, row_ptr: Tensor, col_idx: Tensor, shape: tuple[int, int]) -> "CSR":
        """CSR from its row-major pattern (``row_ptr`` [rows+1], ``col_idx`` [nnz], int32,
        columns sorted within each row): builds the transpose map only."""
        n_rows, n_cols = int(shape[0]), int(shape[1])
        row_ptr, col_idx = row_ptr.to(torch.int32), col_idx.to(torch.int32)
        t_row_ptr, t_col_idx, t_perm = build_transpose(row_ptr, col_idx, n_cols)
        return cls(values.contiguous(), row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, (n_rows, n_cols))

    # ------------------------------------------------------------------ views
    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        total = self.shape[0] * self.shape[1]
        return self.nnz / total if total else 1.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def pattern(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm): the index arguments of the ops."""
        return self.row_ptr, self.col_idx, self.t_row_ptr, self.t_col_idx, self.t_perm

    def rows(self) -> Tensor:
        """Row index (int64) of every non-zero."""
        return _rows_of(self.row_ptr)

    def to_dense(self) -> Tensor:
        """Dense ``[out, in]`` tensor with zeros outside the pattern."""
        return reference.csr_to_dense(self.values.detach(), self.row_ptr, self.col_idx, self.shape[1])

    def mask(self) -> Tensor:
        """Boolean ``[out, in]`` pattern."""
        m = torch.zeros(self.shape, dtype=torch.bool, device=self.values.device)
        m[self.rows(), self.col_idx.long()] = True
        return m

    def to(self, *args, **kwargs) -> "CSR":
        """Moves to a device; a dtype argument applies to ``values`` only."""
        values = self.values.to(*args, **kwargs)
        idx = [t.to(device=values.device) for t in self.pattern()]
        return CSR(values, *idx, shape=self.shape)

    def validate(self) -> None:
        """Raises ValueError if the index structure is inconsistent (O(nnz))."""
        n_rows, n_cols = self.shape
        rp, ci = self.row_ptr, self.col_idx
        if rp.numel() != n_rows + 1 or int(rp[0]) != 0 or int(rp[-1]) != self.nnz:
            raise ValueError("CSR: row_ptr must have rows + 1 entries from 0 to nnz")
        if (rp[1:] < rp[:-1]).any():
            raise ValueError("CSR: row_ptr must be non-decreasing")
        if self.nnz and (int(ci.min()) < 0 or int(ci.max()) >= n_cols):
            raise ValueError(f"CSR: col_idx must lie in [0, {n_cols})")
        t = build_transpose(rp, ci, n_cols)
        if not all(torch.equal(a, b.to(a.dtype)) for a, b in zip(t, (self.t_row_ptr, self.t_col_idx, self.t_perm))):
            raise ValueError("CSR: the transpose map does not match the pattern")
