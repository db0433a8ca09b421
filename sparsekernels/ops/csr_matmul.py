"""The CSR matmul op family: ``spmm``, ``spmm_t`` and ``sddmm``.

For a weight W [out, in] stored as CSR (see ``sparsekernels.reference`` for the argument
convention), the three products of a linear layer y = x W^T are:

    spmm    y[..., out]  = x[..., in]  @ W^T        forward
    spmm_t  dx[..., in]  = dy[..., out] @ W         input gradient (W^T's CSR: a gather)
    sddmm   dvalues[nnz] = (dy^T @ x) at W's non-zeros   weight gradient, never dense

Each is a ``torch.library`` custom op (``torch.ops.sparsekernels.<name>``) with a fake
implementation (so it traces under ``torch.compile`` / ``torch.export``) and autograd
written in terms of the other two, so gradients of gradients work too. The op body picks
the backend (``sparsekernels.backends``); the functions at the bottom are the checked
public entry points.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import _extension, backends, reference
from . import _checks, _eager, _functorch
from ..kernels.launch_plan import launch_plan, rows_sorted


# From this batch on, "auto" also measures the shared-memory tiled CUDA kernel ("cuda:tiled",
# for patterns whose rows have sorted columns) against the strip kernel and the others.
TILED_MIN_ROWS = 256


@functools.cache
def _have_dense_mm() -> bool:
    return _extension.compiled() and hasattr(torch.ops.sparsekernels_C, "csr_dense_mm")


def dense_candidates(lead: Tensor) -> list[str] | None:
    """The backends "auto" measures for a product with the dense operand ``lead`` when it
    may also try "cpu:dense" (csr_dense_mm: the weight densified in C++, then the dense
    GEMM), or None when it may not (another device, a forced backend, no extension)."""
    if lead.device.type == "cpu" and backends.get_backend() == "auto" and _have_dense_mm():
        return [*backends.auto_candidates("cpu"), "cpu:dense"]
    return None


def _release_workspace() -> None:
    torch.ops.sparsekernels_C.release_workspace()


def unmeasured_args(flops: float) -> dict | None:
    """The dispatch args of a product too small to measure (under MEASURE_MIN_FLOPS), or
    None for one that may be measured. Dispatch then follows resolve(), which needs
    neither the shape class nor the candidates (they key and narrow a measurement):
    skipping them took ~25 us of Python off each small CSR product (three per training
    step of a layer), ~40 us off a 1 x 1024 -> 1024 2:4 product (its kernel ~50 us)."""
    return {"flops": flops, "key": (), "candidates": None} if flops < backends.MEASURE_MIN_FLOPS else None


def _dispatch_args(lead: Tensor, row_ptr: Tensor, t_row_ptr: Tensor, nnz: int,
                   tiled_pattern: tuple[Tensor, Tensor] | None = None, dense_variant: bool = False) -> dict:
    """The flops, shape class and candidates under which a CSR product of W [out, in] with
    ``nnz`` non-zeros and a dense operand ``lead`` [..., *] is dispatched. ``tiled_pattern``
    (row_ptr, col_idx) of the rows the kernel walks makes the tiled CUDA variant a
    candidate when its columns are sorted; ``dense_variant`` makes the compiled dense
    GEMM variant ("cpu:dense": spmm / spmm_t on the densified weight, sddmm as the dense
    dy^T x and a gather of the pattern's entries) a candidate on the CPU."""
    out_f, in_f = row_ptr.shape[0] - 1, t_row_ptr.shape[0] - 1
    m = lead.shape[:-1].numel()
    flops = 2.0 * m * out_f * in_f
    if (small := unmeasured_args(flops)) is not None:
        return small
    density = nnz / (out_f * in_f) if out_f * in_f else 1.0
    candidates = None
    if (tiled_pattern is not None and lead.is_cuda and m >= TILED_MIN_ROWS
            and "cuda" in backends.auto_candidates("cuda") and backends.get_backend() == "auto"
            and rows_sorted(*tiled_pattern)):
        candidates = [*backends.auto_candidates("cuda"), "cuda:tiled"]
    if dense_variant:
        # Where the CPU's dense GEMM is much faster than ours per FLOP (bf16 on AMX, or a
        # low sparsity), densifying the weight and running it wins; measured, not assumed.
        candidates = dense_candidates(lead) or candidates
    return {"flops": flops, "key": backends.shape_class(m, out_f, in_f, density=density), "candidates": candidates}


def dispatch_measured(op: str, lead: Tensor, run, args: dict):
    """``backends.dispatch(op, ..., **args)``; when that measured "cpu:dense" and kept
    another backend, frees this thread's workspace, where "cpu:dense" left a dense-sized
    buffer (the other kernels' panels are re-made on their next call)."""
    if args.get("candidates") is None or "cpu:dense" not in args["candidates"]:
        return backends.dispatch(op, lead.device, lead.dtype, run, **args)
    # Only products measured at all can be measured now (skips planned() for the rest).
    measures_now = (args["flops"] >= backends.MEASURE_MIN_FLOPS
                    and backends.planned(op, lead.device, lead.dtype, **args) is None)
    out = backends.dispatch(op, lead.device, lead.dtype, run, **args)
    if measures_now and backends.measured_choice(op, lead.device, lead.dtype, args["key"]) != "cpu:dense":
        _release_workspace()  # "cpu:dense" lost
    return out


def _dispatch(op: str, lead: Tensor, row_ptr: Tensor, t_row_ptr: Tensor, nnz: int, run,
              tiled_pattern: tuple[Tensor, Tensor] | None = None, dense_variant: bool = False):
    """Runs ``run(backend)`` on the backend chosen for the CSR product (``backends.dispatch``)."""
    return dispatch_measured(op, lead, run, _dispatch_args(lead, row_ptr, t_row_ptr, nnz, tiled_pattern,
                                                           dense_variant))


def _compiled(name: str):
    return getattr(torch.ops.sparsekernels_C, name)


def _triton(name: str):
    from ..kernels.triton import sddmm, spmm

    return {"spmm": spmm.spmm, "spmm_t": spmm.spmm_t, "sddmm": sddmm.sddmm}[name]


# Backends whose kernels check their arguments themselves (the C++ CPU kernels): the op
# bodies check the others' arguments on every call, as a direct call of an op skips the
# public entry points.
_SELF_CHECKING = ("cpu", "cpu:dense")
# Backends an eager call may run without the custom op (``_eager``), by device: on the
# CPU the compiled kernels (a forced reference or Triton interpreter stays in the op, as
# tests compare against it); on the GPU every backend, as measured "auto" picks the
# reference (dense cuBLAS on the densified weight) or Triton there too, and the op's
# Python costs more than a small product.
_DIRECT = {"cpu": ("cpu", "cpu:dense"), "cuda": ("cuda", "cuda:tiled", "triton", "reference")}


# --------------------------------------------------------------------------- spmm
def _add_bias(y: Tensor, bias: Tensor | None) -> Tensor:
    """y + bias, in place where y is a fresh tensor of its own (not a view)."""
    if bias is None:
        return y
    return y.add_(bias) if y._base is None else y + bias


def _run_spmm(backend: str, x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
              t_col_idx: Tensor, t_perm: Tensor, bias: Tensor | None) -> Tensor:
    """spmm on ``backend``, for arguments whose shapes, dtypes and devices are checked (by
    the public entry point, or by the op body for a direct call of the op)."""
    if backend == "cpu":  # the C++ CPU kernels check the pattern themselves
        # The bias is added as the kernel writes y: no second pass over the output.
        return _compiled("spmm")(x, values, row_ptr, col_idx, None, False, bias)
    if backend == "cpu:dense":
        return _add_bias(_compiled("csr_dense_mm")(x, values, row_ptr, col_idx, t_row_ptr.shape[0] - 1, False),
                         bias)
    # The GPU kernels and the reference would read out of bounds or wrap on a corrupt
    # pattern: checked once per pattern (cached, no device sync on later calls).
    _checks.check_csr_contents("spmm", row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)
    if backend in ("cuda", "cuda:tiled"):
        order, cols = launch_plan(row_ptr, col_idx, t_row_ptr.shape[0] - 1)
        return _compiled("spmm")(x, values, row_ptr, cols, order, backend == "cuda:tiled", bias)
    if backend == "triton":
        return _add_bias(_triton("spmm")(x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm), bias)
    return _add_bias(reference.spmm(x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm), bias)


@torch.library.custom_op("sparsekernels::spmm", mutates_args=())
def _spmm_op(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
             t_col_idx: Tensor, t_perm: Tensor, bias: Tensor | None = None) -> Tensor:
    _checks.check_features("spmm", "x", x, t_row_ptr.shape[0] - 1)
    pattern = (row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)

    def run(backend: str) -> Tensor:
        if backend not in _SELF_CHECKING:
            # A direct call of the op: the arguments' shapes, dtypes and devices, on every call.
            _checks.check_csr_op("spmm", values, pattern, (("x", x, "in"),))
            if bias is not None:
                _checks.check_bias("spmm", bias, values, row_ptr.shape[0] - 1)
        return _run_spmm(backend, x, values, *pattern, bias)

    return _dispatch("spmm", x, row_ptr, t_row_ptr, values.shape[0], run, tiled_pattern=(row_ptr, col_idx),
                     dense_variant=True)


@_spmm_op.register_fake
def _(x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, bias=None):
    return x.new_empty((*x.shape[:-1], row_ptr.shape[0] - 1))


# --------------------------------------------------------------------------- spmm_t
def _run_spmm_t(backend: str, dy: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
                t_col_idx: Tensor, t_perm: Tensor) -> Tensor:
    """spmm_t on ``backend``, for checked arguments (as :func:`_run_spmm`)."""
    if backend == "cpu":
        return _compiled("spmm_t")(dy, values, t_row_ptr, t_col_idx, t_perm)
    if backend == "cpu:dense":
        return _compiled("csr_dense_mm")(dy, values, row_ptr, col_idx, t_row_ptr.shape[0] - 1, True)
    _checks.check_csr_contents("spmm_t", row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)
    if backend in ("cuda", "cuda:tiled"):
        order, cols = launch_plan(t_row_ptr, t_col_idx, row_ptr.shape[0] - 1)
        return _compiled("spmm_t")(dy, values, t_row_ptr, cols, t_perm, order, backend == "cuda:tiled")
    if backend == "triton":
        return _triton("spmm_t")(dy, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)
    return reference.spmm_t(dy, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)


@torch.library.custom_op("sparsekernels::spmm_t", mutates_args=())
def _spmm_t_op(dy: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
               t_col_idx: Tensor, t_perm: Tensor) -> Tensor:
    _checks.check_features("spmm_t", "dy", dy, row_ptr.shape[0] - 1)
    pattern = (row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)

    def run(backend: str) -> Tensor:
        if backend not in _SELF_CHECKING:
            _checks.check_csr_op("spmm_t", values, pattern, (("dy", dy, "out"),))
        return _run_spmm_t(backend, dy, values, *pattern)

    return _dispatch("spmm_t", dy, row_ptr, t_row_ptr, values.shape[0], run, tiled_pattern=(t_row_ptr, t_col_idx),
                     dense_variant=True)


@_spmm_t_op.register_fake
def _(dy, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm):
    return dy.new_empty((*dy.shape[:-1], t_row_ptr.shape[0] - 1))


# --------------------------------------------------------------------------- sddmm
def _run_sddmm(backend: str, dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
               t_col_idx: Tensor, t_perm: Tensor) -> Tensor:
    """sddmm on ``backend``, for checked arguments (as :func:`_run_spmm`)."""
    if backend == "cpu":
        return _compiled("sddmm")(dy, x, row_ptr, col_idx)
    if backend == "cpu:dense":
        return _compiled("csr_dense_sddmm")(dy, x, row_ptr, col_idx)
    _checks.check_csr_contents("sddmm", row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)
    if backend == "cuda":
        order, cols = launch_plan(row_ptr, col_idx, t_row_ptr.shape[0] - 1)
        return _compiled("sddmm")(dy, x, row_ptr, cols, order)
    if backend == "triton":
        return _triton("sddmm")(dy, x, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)
    return reference.sddmm(dy, x, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)


@torch.library.custom_op("sparsekernels::sddmm", mutates_args=())
def _sddmm_op(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
              t_col_idx: Tensor, t_perm: Tensor) -> Tensor:
    _checks.check_features("sddmm", "dy", dy, row_ptr.shape[0] - 1)
    _checks.check_features("sddmm", "x", x, t_row_ptr.shape[0] - 1)
    _checks.check_same_batch("sddmm", dy, x)
    pattern = (row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)

    def run(backend: str) -> Tensor:
        if backend not in _SELF_CHECKING:
            _checks.check_csr_op("sddmm", dy.new_empty(1).expand(col_idx.shape[0]), pattern,
                                 (("dy", dy, "out"), ("x", x, "in")), against="dy")
        return _run_sddmm(backend, dy, x, *pattern)

    return _dispatch("sddmm", dy, row_ptr, t_row_ptr, col_idx.shape[0], run, dense_variant=True)


@_sddmm_op.register_fake
def _(dy, x, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm):
    return dy.new_empty((col_idx.shape[0],))


# --------------------------------------------------------------------------- autograd
def _save_all(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


@torch.library.custom_op("sparsekernels::spmm_backward_cpu", mutates_args=())
def _spmm_backward_cpu_op(dy: Tensor, x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor,
                          t_row_ptr: Tensor, t_col_idx: Tensor, t_perm: Tensor,
                          bias_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(dx = dy W, dvalues = (dy^T x) at W's pattern, dbias) in one compiled call: one
    sweep over W^T for both products where it pays, else spmm_t and sddmm sharing one
    packing of dy (csrc/cpu/spmm_backward.cpp). dbias [out] (dy summed over the batch,
    taken while dy is packed) when ``bias_grad``, else an empty tensor."""
    dx, dvalues, dbias = _compiled("spmm_backward")(dy, x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm,
                                                    bias_grad)
    return dx, dvalues, dbias


@_spmm_backward_cpu_op.register_fake
def _(dy, x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, bias_grad=False):
    return (x.new_empty(x.shape, dtype=dy.dtype), dy.new_empty(values.shape),
            dy.new_empty((row_ptr.shape[0] - 1,) if bias_grad else (0,)))


def _fused_cpu_backward(grad: Tensor, values: Tensor, row_ptr: Tensor, t_row_ptr: Tensor) -> bool:
    """True when both gradients of spmm may come from one compiled call (one packing of
    dy): CPU tensors, no graph of the backward wanted (no double backward), and both
    products would run on the C++ kernels now."""
    if grad.device.type != "cpu" or torch.is_grad_enabled() or not hasattr(torch.ops.sparsekernels_C, "spmm_backward"):
        return False
    return all(backends.planned(op, grad.device, grad.dtype,
                                **_dispatch_args(grad, row_ptr, t_row_ptr, values.shape[0], dense_variant=True))
               == "cpu" for op in ("spmm_t", "sddmm"))


def _bias_grad(grad: Tensor) -> Tensor:
    """The bias gradient of y [..., out] = ... + bias: grad summed over the leading dims."""
    # (sum over an empty dim tuple would reduce everything: a 1-D grad is its own sum)
    return grad if grad.dim() == 1 else grad.sum(tuple(range(grad.dim() - 1)))


def _spmm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])  # the bias is not needed for any gradient
    ctx.has_bias = inputs[7] is not None


def _spmm_backward(ctx, grad, eager: bool = False):
    """The gradients of spmm. ``eager``: called from ``_EagerSpmm`` (never traced), so
    products that need no graph of their own may skip the custom ops (``_eager``)."""
    x, values, *pattern = ctx.saved_tensors
    # (needs_input_grad may be shorter than the schema when the bias was left out.)
    need_gb = ctx.has_bias and ctx.needs_input_grad[7]
    if ctx.needs_input_grad[0] and ctx.needs_input_grad[1] and _fused_cpu_backward(grad, values, pattern[0],
                                                                                 pattern[2]):
        # The bias gradient comes out of the same call (summed while dy is packed).
        gx, gv, gb = fused_backward(eager, grad, x, values)(grad, x, values, *pattern, need_gb)
        return gx, gv, None, None, None, None, None, gb if need_gb else None
    gb = _bias_grad(grad) if need_gb else None
    gx = spmm_t_in_backward(grad, values, pattern, eager) if ctx.needs_input_grad[0] else None
    gv = sddmm_in_backward(grad, x, pattern, eager) if ctx.needs_input_grad[1] else None
    return gx, gv, None, None, None, None, None, gb


def fused_backward(eager: bool, *tensors: Tensor):
    """The fused CPU backward (``spmm_backward``) to call from a backward on ``tensors``
    (dy and the saved x and values): its kernel directly where ``eager`` and ``_eager``
    allow (the caller checked ``_fused_cpu_backward``), else the custom op."""
    return _compiled("spmm_backward") if eager and _eager.direct_call_allowed(*tensors) else _spmm_backward_cpu_op


def direct_backend(op: str, lead: Tensor, others: tuple, row_ptr: Tensor, t_row_ptr: Tensor, nnz: int,
                   tiled_pattern: tuple[Tensor, Tensor] | None = None, graph_ok: bool = False) -> str | None:
    """The backend (``_DIRECT``) an eager CSR product of these checked arguments may run
    without the custom op (``_eager``): plain CPU or CUDA tensors, no graph to record
    (unless ``graph_ok``: the caller records it with a Function of its own), and the op
    planned on that backend now. None otherwise (the op then runs: it measures, routes to
    a backend the route does not take, or records its graph). ``tiled_pattern`` as for
    the op's own dispatch, so both see the same candidates."""
    if (not graph_ok and _eager.wants_graph(lead, *others)) or not _eager.direct_call_allowed(lead, *others):
        return None
    choice = backends.planned(op, lead.device, lead.dtype,
                              **_dispatch_args(lead, row_ptr, t_row_ptr, nnz, tiled_pattern, dense_variant=True))
    return choice if choice in _DIRECT.get(lead.device.type, ()) else None


def spmm_t_in_backward(dy: Tensor, values: Tensor, pattern: list, eager: bool) -> Tensor:
    """spmm_t for a backward: the kernel directly where ``eager`` allows, else the op."""
    row_ptr, _, t_row_ptr, t_col_idx, _ = pattern
    backend = eager and direct_backend("spmm_t", dy, (values,), row_ptr, t_row_ptr, values.shape[0],
                                       (t_row_ptr, t_col_idx))
    if backend:
        return _run_spmm_t(backend, dy, values, *pattern)
    return _spmm_t(dy, values, *pattern)


def sddmm_in_backward(dy: Tensor, x: Tensor, pattern: list, eager: bool) -> Tensor:
    """sddmm for a backward: the kernel directly where ``eager`` allows, else the op."""
    row_ptr, col_idx, t_row_ptr = pattern[:3]
    backend = eager and direct_backend("sddmm", dy, (x,), row_ptr, t_row_ptr, col_idx.shape[0])
    if backend:
        return _run_sddmm(backend, dy, x, *pattern)
    return _sddmm(dy, x, *pattern)


def _spmm_t_backward(ctx, grad):
    # out = dy W  =>  d dy = grad W^T (spmm),  dW[o, k] = sum_b dy[b, o] grad[b, k] (sddmm)
    dy, values, *pattern = ctx.saved_tensors
    gdy = _spmm(grad, values, *pattern, None) if ctx.needs_input_grad[0] else None
    gv = _sddmm(dy, grad, *pattern) if ctx.needs_input_grad[1] else None
    return gdy, gv, None, None, None, None, None


def _sddmm_backward(ctx, grad):
    # out[e] = sum_b dy[b, row e] x[b, col e]
    #   d dy[b, o] = sum_{e in row o} grad[e] x[b, col e]   = spmm(x, grad)
    #   d x[b, k]  = sum_{e in col k} grad[e] dy[b, row e]  = spmm_t(dy, grad)
    dy, x, *pattern = ctx.saved_tensors
    gdy = _spmm(x, grad, *pattern, None) if ctx.needs_input_grad[0] else None
    gx = _spmm_t(dy, grad, *pattern) if ctx.needs_input_grad[1] else None
    return gdy, gx, None, None, None, None, None


_spmm_op.register_autograd(_spmm_backward, setup_context=_spmm_setup)
_spmm_t_op.register_autograd(_spmm_t_backward, setup_context=_save_all)
_sddmm_op.register_autograd(_sddmm_backward, setup_context=_save_all)

# What the entry points and the backward formulas call (``_functorch``): the ops, or under
# functorch transforms Functions with the same setup_context and backward. Forward-mode
# rules: each product is bilinear in its two operands; spmm is affine in its bias.
_spmm = _functorch.routed(_spmm_op, _spmm_setup, _spmm_backward, "spmm", batch_arg=0,
                          jvp=lambda p, t: _functorch.linear_tangent(_spmm, p, t, (0, 1), bias_slot=7,
                                                                     out_features=p[2].shape[0] - 1))
_spmm_t = _functorch.routed(_spmm_t_op, _save_all, _spmm_t_backward, "spmm_t", batch_arg=0,
                            jvp=lambda p, t: _functorch.linear_tangent(_spmm_t, p, t, (0, 1)))
# (sddmm: dy and x share their batch, so vmap runs it per entry)
_sddmm = _functorch.routed(_sddmm_op, _save_all, _sddmm_backward, "sddmm", batch_arg=None,
                           jvp=lambda p, t: _functorch.linear_tangent(_sddmm, p, t, (0, 1)))


class _EagerSpmm(torch.autograd.Function):
    """spmm on ``backend`` (one of ``_DIRECT``) without the custom op's
    dispatch (``_eager``): the kernel the op would run, the op's backward
    (``_spmm_backward``), so the same bits; used by :func:`spmm` only where the op would
    run that kernel itself."""

    @staticmethod
    def forward(ctx, x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, bias, backend):
        # (backend last: needs_input_grad then lines up with the op's arguments.)
        ctx.save_for_backward(x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)
        ctx.has_bias = bias is not None
        return _run_spmm(backend, x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, bias)

    @staticmethod
    def backward(ctx, grad):
        return (*_spmm_backward(ctx, grad, eager=True), None)


# --------------------------------------------------------------------------- public entry points
def spmm(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
         t_col_idx: Tensor, t_perm: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = x @ W^T (+ bias)`` for a CSR weight W [out, in].

    Args:
        x: [..., in], same floating dtype and device as ``values``.
        values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm: W's CSR and transpose map
            (convention in ``sparsekernels.reference``).
        bias: optional [out], same dtype and device as ``values``. The CPU kernel adds it
            as it writes y (one pass over the output, not two).
    Returns:
        y: [..., out] of x's dtype. Differentiable in ``x``, ``values`` and ``bias``.
    """
    out_f, in_f = _checks.check_csr_pattern("spmm", values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)
    _checks.check_dense("spmm", "x", x, values, in_f)
    if bias is not None:
        _checks.check_bias("spmm", bias, values, out_f)
    backend = direct_backend("spmm", x, (values, bias), row_ptr, t_row_ptr, values.shape[0], (row_ptr, col_idx),
                             graph_ok=True)
    if backend:  # what the op would run, without the op's dispatch (``_eager``)
        if _eager.wants_graph(x, values, bias):
            return _EagerSpmm.apply(x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, bias, backend)
        return _run_spmm(backend, x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, bias)
    return _spmm(x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, bias)


def spmm_t(dy: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
           t_col_idx: Tensor, t_perm: Tensor) -> Tensor:
    """``dx = dy @ W`` for a CSR weight W [out, in] (the input gradient of :func:`spmm`).

    Args:
        dy: [..., out], same dtype and device as ``values``.
    Returns:
        dx: [..., in]. Computed from W^T's CSR (the transpose map): a gather, no atomics.
    """
    out_f, in_f = _checks.check_csr_pattern("spmm_t", values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)
    _checks.check_dense("spmm_t", "dy", dy, values, out_f)
    return _spmm_t(dy, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)


def sddmm(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
          t_col_idx: Tensor, t_perm: Tensor) -> Tensor:
    """``dvalues[e] = sum_b dy[b, row(e)] * x[b, col(e)]``: the weight gradient of
    :func:`spmm` at W's non-zeros only (the dense ``[out, in]`` gradient is never formed).

    Args:
        dy: [..., out]; x: [..., in] with the same leading dimensions and dtype.
    Returns:
        dvalues: [nnz] of dy's dtype.
    """
    dy = _checks.check_tensor("sddmm", "dy", dy)
    if not dy.dtype.is_floating_point:
        raise TypeError(f"sddmm: dy must be a floating dtype, got {dy.dtype}")
    # sddmm has no values argument: check the pattern against a stand-in of dy's dtype.
    nnz = col_idx.shape[0] if isinstance(col_idx, Tensor) and col_idx.dim() == 1 else 0
    placeholder = dy.new_empty(1).expand(nnz)
    out_f, in_f = _checks.check_csr_pattern("sddmm", placeholder, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)
    _checks.check_dense("sddmm", "dy", dy, placeholder, out_f)
    _checks.check_dense("sddmm", "x", x, placeholder, in_f, against="dy")
    _checks.check_same_batch("sddmm", dy, x)
    return _sddmm(dy, x, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)
