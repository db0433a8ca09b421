"""The 2:4 op family: ``sparse24_mm`` (y = x W^T for a 2:4 weight) and the SR-STE linear.

A 2:4 weight W [N, K] is ``values [N, K/2]`` + ``meta [N, K/4]`` (see
``sparsekernels.formats.Sparse24``). Its non-zeros in row-major order are exactly a CSR
matrix with K/2 entries per row, so the backward products reuse the CSR ops: the layer
keeps ``row_ptr``, ``col_idx`` and the transpose map next to ``meta``.

    sparse24_mm(x, values, meta, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)
        forward on the compressed form (C++ CPU kernel; reference elsewhere),
        dx = dy W through W^T's CSR (spmm_t), dvalues at the kept positions (sddmm).
    srste_linear(x, weight, meta, ..., lam)
        SR-STE (Zhou et al. 2021): forward with the 2:4-pruned weight, straight-through
        dense gradient plus the sparse-refined term: dW = dy^T x + lam * (1 - E) * W.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from ..reference import meta_columns
from . import _checks
from .csr_matmul import _sddmm_op, _spmm_t_op


def _dense_24(values: Tensor, meta: Tensor) -> Tensor:
    """The 2:4 weight [N, K] as a dense tensor (differentiable in values)."""
    return values.new_zeros(values.shape[0], 4 * meta.shape[1]).scatter(1, meta_columns(meta), values)


def reference_sparse24_mm(x: Tensor, values: Tensor, meta: Tensor) -> Tensor:
    return x @ _dense_24(values, meta).t()


# GPU policy (UNVERIFIED until bench/gpu_check.sh runs): 2:4 GEMMs on sparse tensor cores
# through torch's semi-structured tensors (cuSPARSELt, or CUTLASS); below this many rows of
# x the weight's bytes dominate and torch's 2:4 was measured by others at 0.11x of dense for
# one row, so dense cuBLAS runs instead. To be replaced by measured per-shape choices.
GPU_MIN_ROWS = 256
_warned: set = set()


def gpu_plan(m: int, n: int, k: int, dtype: torch.dtype) -> str:
    """``"semi_structured"`` or ``"dense"`` (and why) for a 2:4 product on the GPU."""
    from torch.sparse import semi_structured as ss

    if dtype not in (torch.float16, torch.bfloat16):
        return "dense: 2:4 tensor cores need fp16 / bf16"
    # The weight must fit the tiles of whichever library torch picks (CUTLASS or cuSPARSELt).
    cfgs = [getattr(ss, name)._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
            for name in ("SparseSemiStructuredTensorCUTLASS", "SparseSemiStructuredTensorCUSPARSELT") if hasattr(ss, name)]
    if not cfgs or any(c is None or n % c.sparse_min_rows or k % c.sparse_min_cols for c in cfgs):
        return "dense: weight shape not a multiple of the 2:4 GEMM tile"
    if m < GPU_MIN_ROWS:
        return f"dense: fewer than {GPU_MIN_ROWS} rows (2:4 loses to dense there)"
    return "semi_structured"


def _gpu_sparse24_mm(x: Tensor, values: Tensor, meta: Tensor) -> Tensor:
    dense = _dense_24(values, meta)
    x2 = x.reshape(-1, x.shape[-1])
    plan = gpu_plan(x2.shape[0], dense.shape[0], dense.shape[1], x.dtype)
    if plan != "semi_structured":
        if plan not in _warned:  # never a silent fallback: say it once per reason
            _warned.add(plan)
            import warnings

            warnings.warn(f"sparse24_mm on the GPU runs {plan}", stacklevel=3)
        return (x2 @ dense.t()).reshape(*x.shape[:-1], dense.shape[0])
    w = torch.sparse.to_sparse_semi_structured(dense)
    return torch.nn.functional.linear(x2, w).reshape(*x.shape[:-1], dense.shape[0])


@torch.library.custom_op("sparsekernels::sparse24_mm", mutates_args=())
def _sparse24_mm_op(x: Tensor, values: Tensor, meta: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
                    t_col_idx: Tensor, t_perm: Tensor) -> Tensor:
    backend = backends.resolve("sparse24_mm", x.device, x.dtype)
    if backend == "cpu":
        return torch.ops.sparsekernels_C.sparse24_mm(x, values, meta)
    _checks.check_meta("sparse24_mm", meta)  # the CPU kernel checks it itself
    if x.is_cuda and backend in ("cuda", "triton"):
        return _gpu_sparse24_mm(x, values, meta)
    return reference_sparse24_mm(x, values, meta)


@_sparse24_mm_op.register_fake
def _(x, values, meta, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _setup(ctx, inputs, output):
    x, values, meta, *pattern = inputs
    ctx.save_for_backward(x, values, *pattern)


def _backward(ctx, grad):
    x, values, *pattern = ctx.saved_tensors
    flat = values.reshape(-1)
    gx = _spmm_t_op(grad, flat, *pattern) if ctx.needs_input_grad[0] else None
    gv = _sddmm_op(grad, x, *pattern).view_as(values) if ctx.needs_input_grad[1] else None
    return gx, gv, None, None, None, None, None, None


_sparse24_mm_op.register_autograd(_backward, setup_context=_setup)


def sparse24_mm(x: Tensor, values: Tensor, meta: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
                t_col_idx: Tensor, t_perm: Tensor) -> Tensor:
    """``y [..., N] = x [..., K] @ W^T`` for a 2:4 weight (values [N, K/2], meta [N, K/4]
    uint8) whose CSR view is (row_ptr, col_idx) with transpose map (t_row_ptr, t_col_idx,
    t_perm). Differentiable in ``x`` and ``values``."""
    values = _checks.check_tensor("sparse24_mm", "values", values)
    meta = _checks.check_tensor("sparse24_mm", "meta", meta)
    if values.dim() != 2 or meta.dim() != 2 or values.shape[1] != 2 * meta.shape[1] or values.shape[0] != meta.shape[0]:
        raise ValueError(f"sparse24_mm: values [N, K/2] and meta [N, K/4] do not match: {tuple(values.shape)} and "
                         f"{tuple(meta.shape)}")
    if meta.dtype != torch.uint8:
        raise TypeError(f"sparse24_mm: meta must be uint8, got {meta.dtype}")
    out_f, in_f = _checks.check_csr_pattern("sparse24_mm", values.reshape(-1), row_ptr, col_idx, t_row_ptr,
                                            t_col_idx, t_perm)
    if in_f != 4 * meta.shape[1]:
        raise ValueError(f"sparse24_mm: the transpose map has {in_f} columns, meta implies {4 * meta.shape[1]}")
    if col_idx.shape[0] != values.numel() or row_ptr.shape[0] != values.shape[0] + 1:
        raise ValueError("sparse24_mm: the CSR view must have one row per output and values.numel() entries")
    _checks.check_dense("sparse24_mm", "x", x, values, in_f)
    return _sparse24_mm_op(x, values, meta, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)


class _SRSTE(torch.autograd.Function):
    """y = x (W * E)^T; dx = dy (W * E); dW = dy^T x + lam * (1 - E) * W (dense: SR-STE
    keeps dense master weights and a dense straight-through gradient by design)."""

    @staticmethod
    def forward(ctx, x, weight, meta, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, mask, lam):
        values = weight.gather(1, meta_columns(meta))
        ctx.save_for_backward(x, weight, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, mask)
        ctx.lam = lam
        return _sparse24_mm_op(x, values, meta, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)

    @staticmethod
    def backward(ctx, grad):
        x, weight, values, *pattern, mask = ctx.saved_tensors
        gx = _spmm_t_op(grad, values.reshape(-1), *pattern) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            g2 = grad.reshape(-1, grad.shape[-1])
            gw = g2.t() @ x.reshape(-1, x.shape[-1])
            gw = gw + ctx.lam * (~mask) * weight
        return gx, gw, None, None, None, None, None, None, None, None


def srste_linear(x: Tensor, weight: Tensor, meta: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
                 t_col_idx: Tensor, t_perm: Tensor, mask: Tensor, lam: float = 2e-4) -> Tensor:
    """SR-STE product: ``x [..., K] @ (weight * mask)^T`` with the 2:4 ``mask`` given as
    (meta, CSR view); gradient to the dense ``weight`` [N, K] as in Zhou et al. 2021."""
    _checks.check_dense("srste_linear", "x", x, weight, weight.shape[1])
    return _SRSTE.apply(x, weight, meta, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, mask, float(lam))
