"""Launch data the GPU CSR kernels (CUDA C++ and Triton) take next to a pattern, derived
once per pattern.

* ``row_order`` int32 [rows]: the rows sorted by length, longest first (stable), the order
  in which warps take them (Sputnik's row swizzle: the warps of a block get similar work,
  long rows start first).
* ``col_idx`` narrowed to int16 when every column fits (``n_cols <= 32768``): half the
  index bytes, which at 90% sparsity in 16-bit values is a third of the weight's traffic.

Both are cached per pattern (``pattern_cache``) and recomputed when the pattern tensors
change, so a topology update that rebuilds the buffers costs one recompute on the next
call. The cost in memory is 2 bytes per non-zero plus 4 per row, on the pattern's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference import csr_rows, rows_strictly_increasing
from .pattern_cache import PatternCache

INT16_MAX_COLS = 1 << 15  # columns 0 .. 32767 fit int16

_plans = PatternCache()


def build_launch_plan(row_ptr: Tensor, col_idx: Tensor, n_cols: int) -> tuple[Tensor, Tensor]:
    """``(row_order int32 [rows], col_idx int16 or int32 [nnz])`` for a CSR pattern with
    ``n_cols`` columns, computed on the pattern's device (no host sync)."""
    lengths = row_ptr[1:] - row_ptr[:-1]
    order = torch.argsort(lengths, descending=True, stable=True).to(torch.int32)
    cols = col_idx.to(torch.int16) if n_cols <= INT16_MAX_COLS else col_idx
    return order, cols


def launch_plan(row_ptr: Tensor, col_idx: Tensor, n_cols: int) -> tuple[Tensor, Tensor]:
    """:func:`build_launch_plan`, cached per pattern (see module docstring)."""
    def build() -> tuple[Tensor, Tensor | None]:
        order, cols = build_launch_plan(row_ptr, col_idx, n_cols)
        # Never store col_idx itself: the entry would keep its own key alive (a leak).
        return order, (None if cols is col_idx else cols)

    order, cols = _plans.get((col_idx, row_ptr), (n_cols,), build)
    return order, (col_idx if cols is None else cols)


_rows = PatternCache()


def nonzero_rows(row_ptr: Tensor, col_idx: Tensor) -> Tensor:
    """Row (int32) of every non-zero [nnz] (``reference.csr_rows``), cached per pattern;
    built on the device with the output size known from the shapes (no host sync)."""
    return _rows.get((col_idx, row_ptr), (), lambda: csr_rows(row_ptr, col_idx.shape[0]).to(torch.int32))


_sorted = PatternCache()


def rows_sorted(row_ptr: Tensor, col_idx: Tensor) -> bool:
    """True when every row's columns are strictly increasing (what the tiled CUDA kernel
    needs), cached per pattern; one device sync when first asked."""
    return _sorted.get((col_idx, row_ptr), (), lambda: rows_strictly_increasing(row_ptr, col_idx))
