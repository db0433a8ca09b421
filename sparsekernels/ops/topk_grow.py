"""The fused grow-score op: ``topk_grow`` (RigL's regrowth without a dense gradient).

    topk_grow(dy [M, out], x [M, in], row_ptr, col_idx, k) -> (rows [k], cols [k], scores [k])

The k positions of W [out, in] outside the pattern (row_ptr, col_idx) with the largest
``|dy^T x|`` (the magnitude of the dense weight gradient), highest first, ties in
increasing flat position. ``dy`` and ``x`` must be finite (ValueError otherwise, on every
backend): NaN has no place in the ranking. The compiled kernel forms the gradient one tile of rows at a
time (``tile_elems`` entries) and keeps a running top-k: extra memory O(tile + k).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .. import backends, reference
from .._checks import check_int
from . import _checks

# Gradient entries formed at once: 1 Mi fp32 = 4 MiB, a GEMM of >= 128 rows for layers up
# to 8192 wide. Beyond the tile, the candidates: the CPU fp32 kernel keeps at most 2k
# records of 16 bytes; the device-generic body (the GPU, fp64) a pool of about 5k / 4
# (score, int32 position) pairs, measured at 0.15 of an fp64 4096 x 8192 dense gradient
# beyond the answer at k = 30% of nnz (tests/test_topk_grow.py; 0.40 before the pool was
# kept in position order behind a sampled floor).
DEFAULT_TILE_ELEMS = 1 << 20


def reference_topk_grow(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Plain-PyTorch definition (dense gradient): the ground truth for the kernel."""
    kk = x.shape[1]
    ct = torch.float64 if dy.dtype == torch.float64 else torch.float32
    g = (dy.to(ct).t() @ x.to(ct)).abs()
    g[reference.csr_rows(row_ptr), col_idx.long()] = -1.0
    # A stable descending sort of the row-major scores: ties go to the earlier position.
    scores, flat = torch.sort(g.reshape(-1), stable=True, descending=True)
    flat, scores = flat[:k], scores[:k]
    return flat // kk, flat % kk, scores.to(dy.dtype)


@torch.library.custom_op("sparsekernels::topk_grow", mutates_args=())
def _topk_grow_op(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, k: int,
                  tile_elems: int) -> tuple[Tensor, Tensor, Tensor]:
    backend = backends.resolve("topk_grow", dy.device, dy.dtype)
    if backend in ("cpu", "cuda"):
        return torch.ops.sparsekernels_C.topk_grow(dy, x, row_ptr, col_idx, k, tile_elems)
    # The compiled kernels check the pattern's contents; without this a negative col_idx
    # would index from the end and knock out (and so never grow) the wrong position.
    _checks.check_pattern_contents("topk_grow", row_ptr, col_idx, x.shape[1])
    return reference_topk_grow(dy, x, row_ptr, col_idx, k)


@_topk_grow_op.register_fake
def _(dy, x, row_ptr, col_idx, k, tile_elems):
    return (dy.new_empty((k,), dtype=torch.int64), dy.new_empty((k,), dtype=torch.int64), dy.new_empty((k,)))


def topk_grow(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, k: int,
              tile_elems: int = DEFAULT_TILE_ELEMS) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` inactive positions of W with the largest ``|dy^T x|``.

    Args:
        dy: [M, out] output gradient; x: [M, in] layer input (same dtype and device).
        row_ptr [out+1], col_idx [nnz]: int32 CSR pattern of the active positions.
        k: how many positions, 0 <= k <= out * in - nnz.
        tile_elems: gradient entries formed at once (memory bound of the kernel).
    Returns:
        (rows int64 [k], cols int64 [k], scores [k] of dy's dtype), highest score first.
    """
    dy = _checks.check_tensor("topk_grow", "dy", dy)
    x = _checks.check_tensor("topk_grow", "x", x)
    if not dy.dtype.is_floating_point or x.dtype != dy.dtype:
        raise TypeError(f"topk_grow: dy and x must share one floating dtype, got {dy.dtype} and {x.dtype}")
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"topk_grow: dy [M, out] and x [M, in] must be 2-D with equal M, got "
                         f"{tuple(dy.shape)} and {tuple(x.shape)}")
    if x.device != dy.device:
        raise ValueError(f"topk_grow: x is on {x.device} but dy is on {dy.device}")
    for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx)):
        _checks.check_tensor("topk_grow", name, t)
        if t.dtype != torch.int32 or t.dim() != 1:
            raise TypeError(f"topk_grow: {name} must be a 1-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    if row_ptr.shape[0] != dy.shape[1] + 1:
        raise ValueError(f"topk_grow: row_ptr must have out + 1 = {dy.shape[1] + 1} entries, got {row_ptr.shape[0]}")
    if col_idx.shape[0] > dy.shape[1] * x.shape[1]:
        raise ValueError(f"topk_grow: col_idx has {col_idx.shape[0]} entries, more than the out x in = "
                         f"{dy.shape[1]} x {x.shape[1]} positions of dy and x: x's width is not the pattern's")
    inactive = dy.shape[1] * x.shape[1] - col_idx.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= inactive:
        raise ValueError(f"topk_grow: k must be an int in [0, {inactive}] (inactive positions), got {k!r}")
    k = int(k)  # numpy's integers too (the op's schema takes a Python int)
    check_int("tile_elems", tile_elems, "topk_grow")
    # NaN has no rank among the scores (it broke the compiled kernel's cut-off), and a
    # non-finite gradient means the step diverged: refuse it by name on every backend (the
    # compiled kernels check this themselves, with the same message).
    compiled = backends.resolve("topk_grow", dy.device, dy.dtype) in ("cpu", "cuda")
    for name, t, what in (("dy", dy, "the output gradient"), ("x", x, "the layer input")):
        if t.numel() and not compiled and not bool(torch.isfinite(t).all()):
            raise ValueError(f"topk_grow: {name} ({what}) holds NaN or inf values; the growth scores |dy^T x| are "
                             "undefined for non-finite inputs (skip the update or fix the loss scaling)")
    return _topk_grow_op(dy, x, row_ptr, col_idx, k, tile_elems)
