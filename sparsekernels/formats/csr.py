"""CSR format for an unstructured sparse weight W [out, in], with the transpose map.

``values[nnz]`` (the trainable numbers), ``row_ptr[out+1]`` and ``col_idx[nnz]`` (int32)
in row-major order, plus W^T's CSR for the input-gradient product: ``t_row_ptr[in+1]``,
``t_col_idx[nnz]`` (int32, the row of W of each entry) and ``t_perm[nnz]`` (int32,
position of each W^T entry in ``values``). The transpose map depends only on the pattern,
so it is built when the pattern changes, never per step.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import reference
from .._checks import check_int
from .masks import check_mask


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
    # The compiled op checks its arguments; this path did not, and bad indices surfaced as
    # bincount / repeat_interleave errors.
    check_int("n_cols", n_cols, "build_transpose", minimum=0)
    check_index_tensor("build_transpose", "row_ptr", row_ptr)
    check_index_tensor("build_transpose", "col_idx", col_idx)
    check_pattern_contents("build_transpose", row_ptr, col_idx, n_cols)
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


def check_pattern_contents(op: str, ptr: Tensor, idx: Tensor, n_cols: int, ptr_name: str = "row_ptr",
                           idx_name: str = "col_idx") -> None:
    """Checks the index *values* of a CSR-like pattern: ``ptr`` runs from 0 to nnz without
    decreasing and every ``idx`` lies in [0, n_cols). O(nnz) with torch ops (a device sync on
    a GPU); run on the paths that would otherwise read out of bounds or wrap silently."""
    nnz = idx.shape[0]
    if ptr.numel() == 0 or int(ptr[0]) != 0 or int(ptr[-1]) != nnz:
        raise ValueError(f"{op}: {ptr_name} must start at 0 and end at nnz = {nnz}")
    if ptr.numel() > 1 and bool((ptr[1:] < ptr[:-1]).any()):
        raise ValueError(f"{op}: {ptr_name} must be non-decreasing")
    if nnz and (int(idx.min()) < 0 or int(idx.max()) >= n_cols):
        raise ValueError(f"{op}: {idx_name} entries must lie in [0, {n_cols})")


def check_rows_sorted(op: str, ptr: Tensor, idx: Tensor, ptr_name: str = "row_ptr", idx_name: str = "col_idx") -> None:
    """ValueError unless ``idx`` increases strictly within each row of ``ptr`` (checked by
    :func:`check_pattern_contents` first): a position stored twice is summed by the
    kernels but written once by ``to_dense``, so the two disagreed silently. O(nnz)."""
    if not reference.rows_strictly_increasing(ptr, idx):
        raise ValueError(f"{op}: {idx_name} must increase strictly within each row of {ptr_name} (sorted, each "
                         f"position once)")


def check_index_tensor(op: str, name: str, t: object, length: int | None = None) -> Tensor:
    """``t`` unchanged if it is a 1-D integer tensor (of ``length`` entries when given);
    else TypeError (not a tensor, or a float / complex / bool dtype) or ValueError (shape),
    naming ``op`` and ``name``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must be an integer tensor, got {t.dtype}")
    if t.dim() != 1 or (length is not None and t.shape[0] != length):
        want = "1-D" if length is None else f"1-D with {length} entries"
        raise ValueError(f"{op}: {name} must be {want}, got shape {tuple(t.shape)}")
    return t


def _check_shape(op: str, shape: object) -> tuple[int, int]:
    try:
        if isinstance(shape, Tensor) or len(shape) != 2 or any(isinstance(d, bool) for d in shape):
            raise TypeError
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise ValueError(f"{op}: shape must be two non-negative ints (rows, cols), got {shape!r}") from None
    if min(dims) < 0 or max(dims) >= 2**31:
        raise ValueError(f"{op}: shape must be two ints in [0, 2**31) (int32 indices), got {dims}")
    return dims


def _check_values(op: str, values: object, nnz: int) -> Tensor:
    if not isinstance(values, Tensor):
        raise TypeError(f"{op}: values must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() != 1 or values.shape[0] != nnz:
        raise ValueError(f"{op}: values must be 1-D with nnz = {nnz} entries, got shape {tuple(values.shape)}")
    return values


def check_csr_structure(owner: str, nnz: int, pattern: tuple[Tensor, ...], shape: tuple[int, int],
                        names: tuple[str, ...] = ("row_ptr", "col_idx", "t_row_ptr", "t_col_idx", "t_perm"),
                        ) -> tuple[Tensor, ...]:
    """Raises ValueError (TypeError for a non-integer tensor) unless ``pattern`` (row_ptr,
    col_idx, t_row_ptr, t_col_idx, t_perm; any integer dtype, as a checkpoint may hold) is
    a CSR pattern of ``shape`` with ``nnz`` entries and the transpose map
    :func:`build_transpose` gives for it; then returns the five as int32 (after the range
    checks, so nothing wraps). O(nnz); for checkpoints and :meth:`CSR.validate`, not for
    the hot path. A transpose map with the right entries in the wrong order would give
    silently wrong input gradients."""
    n_rows, n_cols = shape
    lengths = (n_rows + 1, nnz, n_cols + 1, nnz, nnz)
    for name, t, length in zip(names, pattern, lengths):
        check_index_tensor(owner, name, t, length)
    row_ptr, col_idx = pattern[0], pattern[1]
    check_pattern_contents(owner, row_ptr, col_idx, n_cols, names[0], names[1])
    check_rows_sorted(owner, row_ptr, col_idx, names[0], names[1])
    row_ptr, col_idx = row_ptr.to(torch.int32), col_idx.to(torch.int32)
    want = build_transpose(row_ptr, col_idx, n_cols)
    for name, t, w in zip(names[2:], pattern[2:], want):
        if not torch.equal(t.to(w.device, torch.int64), w.long()):
            raise ValueError(f"{owner}: {name} is not the transpose map of ({names[0]}, {names[1]})")
    return (row_ptr, col_idx, *(t.to(torch.int32) for t in pattern[2:]))


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
        mask = weight != 0 if mask is None else check_mask("CSR.from_dense", mask, tuple(weight.shape))
        mask = mask.to(weight.device)
        return cls.from_indices(weight[mask], *mask.nonzero(as_tuple=True), shape=tuple(weight.shape), check=False)

    @classmethod
    def from_indices(cls, values: Tensor, rows: Tensor, cols: Tensor, shape: tuple[int, int], *,
                     check: bool = True) -> "CSR":
        """CSR from COO entries given in row-major order (``rows`` sorted, ``cols`` sorted
        within each row, no repeats), e.g. from ``mask.nonzero(as_tuple=True)``.
        ``check``: raise ValueError unless the entries lie in ``shape`` in that order (O(nnz);
        the package's own callers, whose entries are so by construction, skip it)."""
        if check:
            n_rows, n_cols = _check_shape("CSR.from_indices", shape)
            rows = check_index_tensor("CSR.from_indices", "rows", rows)
            cols = check_index_tensor("CSR.from_indices", "cols", cols, rows.shape[0])
            _check_values("CSR.from_indices", values, rows.shape[0])
            if rows.numel():
                r, c = rows.long(), cols.long()
                if int(r.min()) < 0 or int(r.max()) >= n_rows:
                    raise ValueError(f"CSR.from_indices: rows must lie in [0, {n_rows})")
                if int(c.min()) < 0 or int(c.max()) >= n_cols:
                    raise ValueError(f"CSR.from_indices: cols must lie in [0, {n_cols})")
                keys = r * n_cols + c
                if bool((keys[1:] <= keys[:-1]).any()):
                    raise ValueError("CSR.from_indices: entries must be in row-major order (rows sorted, cols "
                                     "increasing within a row), each position once")
        n_rows, n_cols = int(shape[0]), int(shape[1])
        if n_rows * n_cols >= 2**31 and values.numel() >= 2**31:
            raise ValueError("CSR: nnz must fit int32 indices")
        row_ptr = row_ptr_from_rows(rows.long(), n_rows)
        col_idx = cols.to(torch.int32)
        t_row_ptr, t_col_idx, t_perm = build_transpose(row_ptr, col_idx, n_cols)
        return cls(values.contiguous(), row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, (n_rows, n_cols))

    @classmethod
    def from_pattern(cls, values: Tensor, row_ptr: Tensor, col_idx: Tensor, shape: tuple[int, int], *,
                     check: bool = True) -> "CSR":
        """CSR from its row-major pattern (``row_ptr`` [rows+1], ``col_idx`` [nnz], integer,
        columns sorted within each row): builds the transpose map only. ``check``: raise
        ValueError unless the pattern fits ``shape`` with each row's columns increasing
        (O(nnz); skipped by the package's own callers), before the indices are narrowed to
        int32."""
        if check:
            n_rows, n_cols = _check_shape("CSR.from_pattern", shape)
            row_ptr = check_index_tensor("CSR.from_pattern", "row_ptr", row_ptr, n_rows + 1)
            col_idx = check_index_tensor("CSR.from_pattern", "col_idx", col_idx)
            _check_values("CSR.from_pattern", values, col_idx.shape[0])
            check_pattern_contents("CSR.from_pattern", row_ptr, col_idx, n_cols)
            check_rows_sorted("CSR.from_pattern", row_ptr, col_idx)
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
        check_csr_structure("CSR", self.nnz, self.pattern(), self.shape)
