"""The BSR matmul op family: ``bsr_mm``, ``bsr_mm_t``, ``bsr_sddmm`` (block-sparse
twins of spmm / spmm_t / sddmm) for W [N, K] in b x b blocks.

Arguments: ``values [nb, b, b]``, ``crow [N/b + 1]``, ``ccol [nb]`` (int32) and the
transpose map ``t_crow [K/b + 1]``, ``t_ccol [nb]``, ``t_perm [nb]`` (see
``sparsekernels.formats.BSR``).

    bsr_mm     y[..., N]      = x[..., K] @ W^T
    bsr_mm_t   dx[..., K]     = dy[..., N] @ W
    bsr_sddmm  dvalues[nb,b,b] = (dy^T @ x) at the stored blocks

Backends: Triton (GPU; CPU interpreter in tests) and the reference, which gathers the
blocks and runs one batched contraction, no dense weight (so it is also the CPU path).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from ..formats.bsr import BLOCK_SIZES
from ..reference import csr_rows
from . import _checks, _functorch


# --------------------------------------------------------------------------- reference
def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp16 / bf16 (one rounding at the end, as a dense
    matmul; block products rounded to bf16 and summed in bf16 had ~3x its error), else the
    input's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def reference_bsr_mm(x, values, crow, ccol, t_crow, t_ccol, t_perm):
    b = values.shape[-1]
    lead, m = x.shape[:-1], x.shape[:-1].numel()
    nbr = crow.numel() - 1
    ct = _acc(x.dtype)
    xg = x.reshape(m, x.shape[-1] // b, b)[:, ccol.long()].to(ct)  # [M, nb, b]
    contrib = torch.einsum("mnk,nok->mno", xg, values.to(ct))      # block contributions
    y = xg.new_zeros(m, nbr, b).index_add_(1, csr_rows(crow), contrib)
    return y.to(x.dtype).reshape(*lead, nbr * b)


def reference_bsr_mm_t(dy, values, crow, ccol, t_crow, t_ccol, t_perm):
    b = values.shape[-1]
    lead, m = dy.shape[:-1], dy.shape[:-1].numel()
    nbc = t_crow.numel() - 1
    ct = _acc(dy.dtype)
    dyg = dy.reshape(m, dy.shape[-1] // b, b)[:, csr_rows(crow)].to(ct)  # [M, nb, b]
    contrib = torch.einsum("mno,nok->mnk", dyg, values.to(ct))
    dx = dyg.new_zeros(m, nbc, b).index_add_(1, ccol.long(), contrib)
    return dx.to(dy.dtype).reshape(*lead, nbc * b)


def reference_bsr_sddmm(dy, x, crow, ccol, t_crow, t_ccol, t_perm, values_like):
    b = values_like.shape[-1]
    m = dy.shape[:-1].numel()
    ct = _acc(dy.dtype)
    dyg = dy.reshape(m, dy.shape[-1] // b, b)[:, csr_rows(crow)].to(ct)
    xg = x.reshape(m, x.shape[-1] // b, b)[:, ccol.long()].to(ct)
    return torch.einsum("mno,mnk->nok", dyg, xg).to(values_like.dtype)


def _static_backend(op: str, t: Tensor, block: int) -> str:
    """"triton" or "reference": the compiled CPU / CUDA libraries have no BSR kernels, so
    "auto" takes Triton where it runs natively (GPU) and the reference (block gather + one
    batched contraction) elsewhere; an explicit request is honoured as far as it applies:
    the Triton kernels take the block sizes of ``BLOCK_SIZES`` only (tl.dot tiles)."""
    if block not in BLOCK_SIZES:
        return "reference"
    if backends.get_backend() == "auto":
        return "triton" if "triton" in backends.auto_candidates(t.device.type) else "reference"
    return "triton" if backends.resolve(op, t.device, t.dtype) == "triton" else "reference"


def _dispatch(op: str, lead: Tensor, pattern: tuple, values: Tensor, run):
    """``backends.dispatch`` for a BSR product with dense operand ``lead`` [..., *] and the
    pattern (crow, ccol, t_crow, t_ccol, t_perm): on the GPU, Triton is measured against
    the reference per problem class. The pattern's index values are checked first, here
    in the op's body: no BSR kernel checks them, and a bad one would wrap or read out of
    bounds. Once per pattern (no device sync on later calls); not in the entry points,
    where ``torch.export`` traces fake tensors without values."""
    _checks.check_csr_contents(op, *pattern, names=_checks.BSR_NAMES[:4])
    crow, t_crow = pattern[0], pattern[2]
    b = values.shape[-1]
    out_blocks, in_blocks = crow.shape[0] - 1, t_crow.shape[0] - 1
    m = lead.shape[:-1].numel()
    density = values.shape[0] / (out_blocks * in_blocks) if out_blocks * in_blocks else 1.0
    cands = [c for c in ("triton", "reference") if c in backends.auto_candidates(lead.device.type)
             and (c != "triton" or b in BLOCK_SIZES)]
    return backends.dispatch(op, lead.device, lead.dtype, run,
                             flops=2.0 * m * out_blocks * in_blocks * b * b,
                             key=backends.shape_class(m, out_blocks * b, in_blocks * b, b, density=density),
                             candidates=cands, static=_static_backend(op, lead, b))


def _check_values_blocks(op: str, values: object) -> Tensor:
    values = _checks.check_tensor(op, "values", values)
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"{op}: values must be [nb, b, b], got {tuple(values.shape)}")
    return values


def _check_bsr_op(op: str, values: Tensor, pattern: tuple[Tensor, ...],
                  dense: tuple[tuple[str, Tensor, str], ...]) -> None:
    """The entry point's checks in the op's body (no BSR kernel checks its arguments): a
    direct call of ``torch.ops.sparsekernels.<op>`` with fewer blocks of values than the
    pattern had read past their end."""
    _check_values_blocks(op, values)
    _checks.check_csr_op(op, values, pattern, dense, names=_checks.BSR_NAMES)


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("sparsekernels::bsr_mm", mutates_args=())
def _bsr_mm_op(x: Tensor, values: Tensor, crow: Tensor, ccol: Tensor, t_crow: Tensor, t_ccol: Tensor,
               t_perm: Tensor) -> Tensor:
    _check_bsr_op("bsr_mm", values, (crow, ccol, t_crow, t_ccol, t_perm), (("x", x, "in"),))

    def run(backend: str) -> Tensor:
        if backend == "triton":
            from ..kernels.triton import bsr

            return bsr.bsr_mm(x, values, crow, ccol, t_crow, t_ccol, t_perm)
        return reference_bsr_mm(x, values, crow, ccol, t_crow, t_ccol, t_perm)

    return _dispatch("bsr_mm", x, (crow, ccol, t_crow, t_ccol, t_perm), values, run)


@_bsr_mm_op.register_fake
def _(x, values, crow, ccol, t_crow, t_ccol, t_perm):
    return x.new_empty((*x.shape[:-1], (crow.shape[0] - 1) * values.shape[-1]))


@torch.library.custom_op("sparsekernels::bsr_mm_t", mutates_args=())
def _bsr_mm_t_op(dy: Tensor, values: Tensor, crow: Tensor, ccol: Tensor, t_crow: Tensor, t_ccol: Tensor,
                 t_perm: Tensor) -> Tensor:
    _check_bsr_op("bsr_mm_t", values, (crow, ccol, t_crow, t_ccol, t_perm), (("dy", dy, "out"),))

    def run(backend: str) -> Tensor:
        if backend == "triton":
            from ..kernels.triton import bsr

            return bsr.bsr_mm_t(dy, values, crow, ccol, t_crow, t_ccol, t_perm)
        return reference_bsr_mm_t(dy, values, crow, ccol, t_crow, t_ccol, t_perm)

    return _dispatch("bsr_mm_t", dy, (crow, ccol, t_crow, t_ccol, t_perm), values, run)


@_bsr_mm_t_op.register_fake
def _(dy, values, crow, ccol, t_crow, t_ccol, t_perm):
    return dy.new_empty((*dy.shape[:-1], (t_crow.shape[0] - 1) * values.shape[-1]))


@torch.library.custom_op("sparsekernels::bsr_sddmm", mutates_args=())
def _bsr_sddmm_op(dy: Tensor, x: Tensor, crow: Tensor, ccol: Tensor, t_crow: Tensor, t_ccol: Tensor,
                  t_perm: Tensor, values_like: Tensor) -> Tensor:
    _check_bsr_op("bsr_sddmm", values_like, (crow, ccol, t_crow, t_ccol, t_perm),
                  (("dy", dy, "out"), ("x", x, "in")))
    _checks.check_same_batch("bsr_sddmm", dy, x)

    def run(backend: str) -> Tensor:
        if backend == "triton":
            from ..kernels.triton import bsr

            return bsr.bsr_sddmm(dy, x, crow, ccol, t_crow, t_ccol, t_perm, values_like)
        return reference_bsr_sddmm(dy, x, crow, ccol, t_crow, t_ccol, t_perm, values_like)

    return _dispatch("bsr_sddmm", dy, (crow, ccol, t_crow, t_ccol, t_perm), values_like, run)


@_bsr_sddmm_op.register_fake
def _(dy, x, crow, ccol, t_crow, t_ccol, t_perm, values_like):
    return dy.new_empty(values_like.shape)


def _save(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bsr_mm_backward(ctx, grad):
    x, values, *pattern = ctx.saved_tensors
    gx = _bsr_mm_t(grad, values, *pattern) if ctx.needs_input_grad[0] else None
    gv = _bsr_sddmm(grad, x, *pattern, values) if ctx.needs_input_grad[1] else None
    return gx, gv, None, None, None, None, None


def _bsr_mm_t_backward(ctx, grad):
    dy, values, *pattern = ctx.saved_tensors
    gdy = _bsr_mm(grad, values, *pattern) if ctx.needs_input_grad[0] else None
    gv = _bsr_sddmm(dy, grad, *pattern, values) if ctx.needs_input_grad[1] else None
    return gdy, gv, None, None, None, None, None


def _bsr_sddmm_backward(ctx, grad):
    dy, x, *rest = ctx.saved_tensors
    pattern = rest[:5]
    gdy = _bsr_mm(x, grad, *pattern) if ctx.needs_input_grad[0] else None
    gx = _bsr_mm_t(dy, grad, *pattern) if ctx.needs_input_grad[1] else None
    return gdy, gx, None, None, None, None, None, None


_bsr_mm_op.register_autograd(_bsr_mm_backward, setup_context=_save)
_bsr_mm_t_op.register_autograd(_bsr_mm_t_backward, setup_context=_save)
_bsr_sddmm_op.register_autograd(_bsr_sddmm_backward, setup_context=_save)
# What the entry points and the backward formulas call (``_functorch``).
# Each product is bilinear in its two dense / values operands (the forward-mode rules).
_bsr_mm = _functorch.routed(_bsr_mm_op, _save, _bsr_mm_backward, "bsr_mm", batch_arg=0,
                            jvp=lambda p, t: _functorch.linear_tangent(_bsr_mm, p, t, (0, 1)))
_bsr_mm_t = _functorch.routed(_bsr_mm_t_op, _save, _bsr_mm_t_backward, "bsr_mm_t", batch_arg=0,
                              jvp=lambda p, t: _functorch.linear_tangent(_bsr_mm_t, p, t, (0, 1)))
_bsr_sddmm = _functorch.routed(_bsr_sddmm_op, _save, _bsr_sddmm_backward, "bsr_sddmm", batch_arg=None,
                               jvp=lambda p, t: _functorch.linear_tangent(_bsr_sddmm, p, t, (0, 1)))


# --------------------------------------------------------------------------- entry points
def bsr_mm(x: Tensor, values: Tensor, crow: Tensor, ccol: Tensor, t_crow: Tensor, t_ccol: Tensor,
           t_perm: Tensor) -> Tensor:
    """``y [..., N] = x [..., K] @ W^T`` for a BSR weight (differentiable in x and values)."""
    _check_bsr_op("bsr_mm", values, (crow, ccol, t_crow, t_ccol, t_perm), (("x", x, "in"),))
    return _bsr_mm(x, values, crow, ccol, t_crow, t_ccol, t_perm)


def bsr_mm_t(dy: Tensor, values: Tensor, crow: Tensor, ccol: Tensor, t_crow: Tensor, t_ccol: Tensor,
             t_perm: Tensor) -> Tensor:
    """``dx [..., K] = dy [..., N] @ W`` for a BSR weight."""
    _check_bsr_op("bsr_mm_t", values, (crow, ccol, t_crow, t_ccol, t_perm), (("dy", dy, "out"),))
    return _bsr_mm_t(dy, values, crow, ccol, t_crow, t_ccol, t_perm)


def bsr_sddmm(dy: Tensor, x: Tensor, values: Tensor, crow: Tensor, ccol: Tensor, t_crow: Tensor, t_ccol: Tensor,
              t_perm: Tensor) -> Tensor:
    """``dvalues [nb, b, b]``: the weight gradient of :func:`bsr_mm` at the stored blocks
    (``values`` gives the block shape; its numbers are not used)."""
    _check_bsr_op("bsr_sddmm", values, (crow, ccol, t_crow, t_ccol, t_perm), (("dy", dy, "out"), ("x", x, "in")))
    _checks.check_same_batch("bsr_sddmm", dy, x)
    return _bsr_sddmm(dy, x, crow, ccol, t_crow, t_ccol, t_perm, values.detach())
