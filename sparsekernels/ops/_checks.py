"""Input checks shared by the ops' Python entry points: clear ValueError / TypeError
messages naming the argument, before anything reaches a kernel."""

from __future__ import annotations

import torch
from torch import Tensor

from ..formats.csr import check_pattern_contents  # noqa: F401  (shared with the format's checks)
from ..formats.sparse24 import check_meta_bytes
from ..kernels.pattern_cache import PatternCache
from .autocast import same_cast_dtype

INDEX_DTYPES = (torch.int32,)
PERM_DTYPES = (torch.int32, torch.int64)


def check_tensor(op: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


CSR_NAMES = ("row_ptr", "col_idx", "t_row_ptr", "t_col_idx", "t_perm")
BSR_NAMES = ("crow", "ccol", "t_crow", "t_ccol", "t_perm")


def check_csr_pattern(op: str, values: Tensor, row_ptr: Tensor, col_idx: Tensor,
                      t_row_ptr: Tensor, t_col_idx: Tensor, t_perm: Tensor,
                      names: tuple[str, ...] = CSR_NAMES) -> tuple[int, int]:
    """Checks the CSR + transpose-map arguments (called ``names`` in messages: BSR_NAMES
    for a block pattern, whose ``values`` then holds one entry per block); returns
    (out_features, in_features), in blocks for a block pattern."""
    pattern = dict(zip(names, (row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)))
    for name, t in (("values", values), *pattern.items()):
        check_tensor(op, name, t)
        if t.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(t.shape)}")
    if not values.dtype.is_floating_point:
        raise TypeError(f"{op}: values must be a floating dtype, got {values.dtype}")
    for name, t in list(pattern.items())[:4]:
        if t.dtype not in INDEX_DTYPES:
            raise TypeError(f"{op}: {name} must be int32, got {t.dtype}")
    if t_perm.dtype not in PERM_DTYPES:
        raise TypeError(f"{op}: {names[4]} must be int32 or int64, got {t_perm.dtype}")
    nnz = values.shape[0]
    for name, t in ((names[1], col_idx), (names[3], t_col_idx), (names[4], t_perm)):
        if t.shape[0] != nnz:
            raise ValueError(f"{op}: {name} must have nnz = {nnz} entries (as values), got {t.shape[0]}")
    if row_ptr.shape[0] < 1 or t_row_ptr.shape[0] < 1:
        raise ValueError(f"{op}: {names[0]} and {names[2]} need at least one entry (rows + 1)")
    device = values.device
    for name, t in pattern.items():
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but values is on {device}")
    return row_ptr.shape[0] - 1, t_row_ptr.shape[0] - 1


def check_dense(op: str, name: str, x: object, values: Tensor, features: int,
                against: str = "the weight values") -> Tensor:
    """Checks a dense operand [..., features] against the dtype and device of ``values``
    (called ``against`` in messages)."""
    x = check_tensor(op, name, x)
    # Under autocast the op casts both to the autocast dtype first (ops/autocast.py): compare
    # the dtypes the product will see.
    if not same_cast_dtype(x, values):
        raise TypeError(f"{op}: {name} has dtype {x.dtype} but {against} {'have' if against.endswith('s') else 'has'} "
                        f"{values.dtype}")
    if x.device != values.device:
        raise ValueError(f"{op}: {name} is on {x.device} but {against} {'are' if against.endswith('s') else 'is'} on "
                         f"{values.device}")
    if x.dim() < 1 or x.shape[-1] != features:
        raise ValueError(f"{op}: {name} must have shape [..., {features}], got {tuple(x.shape)}")
    return x


def check_csr_op(op: str, values: Tensor, pattern: tuple[Tensor, ...], dense: tuple[tuple[str, Tensor, str], ...],
                 names: tuple[str, ...] = CSR_NAMES, against: str = "the weight values") -> None:
    """In a custom op's body, before a backend whose kernels do not check their arguments
    (Triton, CUDA, the reference): what the public entry point checks, for a direct call of
    ``torch.ops.sparsekernels.<op>``: the pattern against ``values`` (one entry per block
    for a block pattern), and each dense operand (name, tensor, "out" / "in": the side of
    the weight it meets) against their dtype, device and width. Values shorter than the
    pattern had been read past their end (a segfault under Triton's CPU interpreter)."""
    flat = values if values.dim() == 1 else values.new_empty(1).expand(values.shape[0])
    out_f, in_f = check_csr_pattern(op, flat, *pattern, names=names)
    scale = values.shape[-1] if values.dim() == 3 else 1  # b x b blocks: features per block row
    for name, t, side in dense:
        check_dense(op, name, t, values, (out_f if side == "out" else in_f) * scale, against=against)


def check_bias(op: str, bias: object, values: Tensor, features: int) -> Tensor:
    """A bias [features] of the weight's dtype and device: 1-D (a [1, features] one had
    passed :func:`check_dense` and been refused inside the kernel, under another op's
    name)."""
    bias = check_dense(op, "bias", bias, values, features)
    if bias.dim() != 1:
        raise ValueError(f"{op}: bias must be 1-D [{features}], got shape {tuple(bias.shape)}")
    return bias


def check_features(op: str, name: str, t: Tensor, features: int) -> None:
    """The shape part of :func:`check_dense` alone, for the custom ops' bodies: the public
    entry points have checked everything, but a direct call of
    ``torch.ops.sparsekernels.<op>`` must not take a wider operand's first columns for all
    of it (the kernels read the weight's width, not the operand's)."""
    if t.dim() < 1 or t.shape[-1] != features:
        raise ValueError(f"{op}: {name} must have shape [..., {features}], got {tuple(t.shape)}")


def check_same_batch(op: str, dy: Tensor, x: Tensor) -> None:
    """dy [..., out] and x [..., in] of a weight-gradient product share their leading dims."""
    if dy.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{op}: dy {tuple(dy.shape)} and x {tuple(x.shape)} must have the same leading dimensions")


_validated = PatternCache()


def check_csr_contents(op: str, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor, t_col_idx: Tensor,
                       t_perm: Tensor, names: tuple[str, str, str, str] = ("row_ptr", "col_idx", "t_row_ptr",
                                                                            "t_col_idx")) -> None:
    """:func:`check_pattern_contents` for W and W^T, and ``t_perm`` in [0, nnz). A pattern
    that passed is remembered while its tensors stay unchanged (``PatternCache``), so the
    hot path of the Triton / reference backends has no device sync after the first call."""
    _validated.get((col_idx, row_ptr, t_row_ptr, t_col_idx, t_perm), (),
                   lambda: _check_csr_contents(op, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, names))


def _check_csr_contents(op: str, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor, t_col_idx: Tensor,
                        t_perm: Tensor, names: tuple[str, str, str, str]) -> bool:
    out_f, in_f = row_ptr.shape[0] - 1, t_row_ptr.shape[0] - 1
    check_pattern_contents(op, row_ptr, col_idx, in_f, names[0], names[1])
    check_pattern_contents(op, t_row_ptr, t_col_idx, out_f, names[2], names[3])
    nnz = col_idx.shape[0]
    if nnz and (int(t_perm.min()) < 0 or int(t_perm.max()) >= nnz):
        raise ValueError(f"{op}: t_perm entries must lie in [0, nnz = {nnz})")
    return True


_validated_meta = PatternCache()


def check_meta(op: str, meta: Tensor) -> None:
    """2:4 metadata bytes must be i0 | i1 << 2 with 0 <= i0 < i1 < 4. Checked once per meta
    tensor while it stays unchanged (a device sync on the GPU only then)."""
    _validated_meta.get((meta,), (), lambda: _check_meta(op, meta))


def _check_meta(op: str, meta: Tensor) -> bool:
    check_meta_bytes(op, meta)
    return True
