"""Input checks shared by the ops' Python entry points: clear ValueError / TypeError
messages naming the argument, before anything reaches a kernel."""

from __future__ import annotations

import torch
from torch import Tensor

INDEX_DTYPES = (torch.int32,)
PERM_DTYPES = (torch.int32, torch.int64)


def check_tensor(op: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_csr_pattern(op: str, values: Tensor, row_ptr: Tensor, col_idx: Tensor,
                      t_row_ptr: Tensor, t_col_idx: Tensor, t_perm: Tensor) -> tuple[int, int]:
    """Checks the CSR + transpose-map arguments; returns (out_features, in_features)."""
    for name, t in (("values", values), ("row_ptr", row_ptr), ("col_idx", col_idx),
                    ("t_row_ptr", t_row_ptr), ("t_col_idx", t_col_idx), ("t_perm", t_perm)):
        check_tensor(op, name, t)
        if t.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(t.shape)}")
    if not values.dtype.is_floating_point:
        raise TypeError(f"{op}: values must be a floating dtype, got {values.dtype}")
    for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx), ("t_row_ptr", t_row_ptr),
                    ("t_col_idx", t_col_idx)):
        if t.dtype not in INDEX_DTYPES:
            raise TypeError(f"{op}: {name} must be int32, got {t.dtype}")
    if t_perm.dtype not in PERM_DTYPES:
        raise TypeError(f"{op}: t_perm must be int32 or int64, got {t_perm.dtype}")
    nnz = values.shape[0]
    for name, t in (("col_idx", col_idx), ("t_col_idx", t_col_idx), ("t_perm", t_perm)):
        if t.shape[0] != nnz:
            raise ValueError(f"{op}: {name} must have nnz = {nnz} entries (as values), got {t.shape[0]}")
    if row_ptr.shape[0] < 1 or t_row_ptr.shape[0] < 1:
        raise ValueError(f"{op}: row_ptr and t_row_ptr need at least one entry (rows + 1)")
    device = values.device
    for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx), ("t_row_ptr", t_row_ptr),
                    ("t_col_idx", t_col_idx), ("t_perm", t_perm)):
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but values is on {device}")
    return row_ptr.shape[0] - 1, t_row_ptr.shape[0] - 1


def check_dense(op: str, name: str, x: object, values: Tensor, features: int) -> Tensor:
    """Checks a dense operand [..., features] against the weight's dtype and device."""
    x = check_tensor(op, name, x)
    if x.dtype != values.dtype:
        raise TypeError(f"{op}: {name} has dtype {x.dtype} but the weight values have {values.dtype}")
    if x.device != values.device:
        raise ValueError(f"{op}: {name} is on {x.device} but the weight values are on {values.device}")
    if x.dim() < 1 or x.shape[-1] != features:
        raise ValueError(f"{op}: {name} must have shape [..., {features}], got {tuple(x.shape)}")
    return x
