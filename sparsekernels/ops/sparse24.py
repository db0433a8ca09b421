"""The 2:4 op family: ``sparse24_mm`` (y = x W^T for a 2:4 weight) and the SR-STE linear.

A 2:4 weight W [N, K] is ``values [N, K/2]`` + ``meta [N, K/4]`` (see
``sparsekernels.formats.Sparse24``). Its non-zeros in row-major order are exactly a CSR
matrix with K/2 entries per row, so the backward products can reuse the CSR ops: the
layer keeps ``row_ptr``, ``col_idx`` and the transpose map next to ``meta``.

    sparse24_mm(x, values, meta, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, bias, transposable)
        forward on the compressed form (C++ CPU kernel; sparse tensor cores on the GPU,
        bias fused). Backward on the CPU: dx = dy W and dvalues at the kept positions on
        the compressed form too (sparse24_mm_t, sparse24_sddmm, or their dense variants
        where measured faster); a double backward and the GPU use the CSR view (spmm_t,
        sddmm), or for a transposable mask on the GPU sparse tensor cores on W^T.
    srste_linear(x, weight, meta, ..., lam)
        SR-STE (Zhou et al. 2021): forward with the 2:4-pruned weight, straight-through
        dense gradient plus the sparse-refined term: dW = dy^T x + lam * (1 - E) * W.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .. import _extension, backends, reference
from ..formats.sparse24 import check_meta_bytes
from ..kernels.pattern_cache import PatternCache
from ..reference import meta_columns
from . import _checks, _eager, _functorch, autocast
from .csr_matmul import (_fused_cpu_backward, _spmm_t, dense_candidates, dispatch_measured, fused_backward,
                         sddmm_in_backward, spmm_t_in_backward, unmeasured_args)


def _rows2d(t: Tensor) -> Tensor:
    """``t`` [..., n] as [M, n] (not reshape(-1, n): ambiguous when n == 0)."""
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])


_dense_24 = reference.sparse24_to_dense  # the 2:4 weight [N, K] as a dense tensor


# GPU policy (run on the H200, 12-04; the small-batch kernel below not yet): 2:4 GEMMs on
# sparse tensor cores through torch's semi-structured tensors (cuSPARSELt, or CUTLASS),
# bias fused by the library. Below GPU_MIN_ROWS rows of x the weight's bytes dominate (torch's 2:4 was
# measured by others at 0.11x of dense for one row) and dense cuBLAS runs; from there on
# "auto" measures 2:4 against dense per shape (backends.dispatch) and keeps the faster.
GPU_MIN_ROWS = 256
# Up to this many rows of x, our CUDA kernel on the compressed form runs the forward
# (csrc/cuda/sparse24_mm.cu: a warp per output row, the partial sums of every row of x in
# registers; any shape and dtype): at one row, torch's 2:4 GEMM (it pads x to its tile)
# took 18x cuBLAS's time on the H200 and densifying the weight per call 14x
# (bench/results/h200-20261204.json).
GPU_SMALL_ROWS = 32
_warned: set = set()


@functools.cache
def _have_small_rows_kernel() -> bool:
    """Whether the extension holds the compressed-form CUDA kernel (a CUDA build)."""
    return _extension.compiled_with_cuda()


def _warn_once(message: str) -> None:
    """Never a silent fallback to dense: each reason is said once per process."""
    if message not in _warned:
        _warned.add(message)
        import warnings

        warnings.warn(message, stacklevel=4)


def gpu_support(n: int, k: int, dtype: torch.dtype) -> str | None:
    """Why a 2:4 weight [n, k] (2:4 along k) cannot run on sparse tensor cores, or None."""
    from torch.sparse import semi_structured as ss

    if dtype not in (torch.float16, torch.bfloat16):
        return "2:4 tensor cores need fp16 / bf16"
    # The weight must fit the tiles of whichever library torch picks (CUTLASS or cuSPARSELt).
    cfgs = [getattr(ss, name)._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
            for name in ("SparseSemiStructuredTensorCUTLASS", "SparseSemiStructuredTensorCUSPARSELT") if hasattr(ss, name)]
    if not cfgs or any(c is None or n % c.sparse_min_rows or k % c.sparse_min_cols for c in cfgs):
        return f"weight shape {(n, k)} not a multiple of the 2:4 GEMM tile"
    return None


def gpu_plan(m: int, n: int, k: int, dtype: torch.dtype, transposed: bool = False) -> str:
    """``"compressed"`` (our small-batch CUDA kernel, forward only), ``"semi_structured"``
    or ``"dense: <why>"`` for a GPU product of x [m, k] with a 2:4 weight [n, k] (with
    ``transposed``: the input gradient's product with W^T), before any measurement."""
    if m <= GPU_SMALL_ROWS and not transposed and _have_small_rows_kernel():
        return "compressed"
    why = gpu_support(n, k, dtype)
    if why is not None:
        return f"dense: {why}"
    if m < GPU_MIN_ROWS:
        return f"dense: fewer than {GPU_MIN_ROWS} rows (2:4 loses to dense there)"
    return "semi_structured"


# torch's semi-structured form of the last W (or W^T) seen per values tensor: repeated
# products with unchanged values (inference, or forward and backward of one step) do not
# compress again; an optimizer step writes values in place, which invalidates the entry.
_semi_structured = PatternCache()


def _semi_structured_weight(values: Tensor, meta: Tensor, transposed: bool):
    def build():
        dense = _dense_24(values, meta)
        return torch.sparse.to_sparse_semi_structured(dense.t().contiguous() if transposed else dense)

    return _semi_structured.get((values, meta), (transposed,), build)


def _semi_structured_result(y: Tensor, rows: int, cols: int) -> Tensor:
    """The [rows, cols] product as a contiguous tensor, whatever layout torch's 2:4 GEMM
    returned: torch 2.11 pads the dense operand to the GEMM tile and hands back a
    transposed view of the padded result (sliced, or not, by version), torch 2.14 a plain
    contiguous tensor. The op's fake implementation promises a contiguous output."""
    if y.dim() != 2 or y.shape[0] < rows or y.shape[1] < cols:
        raise RuntimeError(f"2:4 GEMM returned shape {tuple(y.shape)} for a [{rows}, {cols}] product")
    return y[:rows, :cols].contiguous()


def _linear_24(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None, op: str,
               transposed: bool = False) -> Tensor:
    """``x [..., k] @ W^T (+ bias)`` for the 2:4 weight W [n, k] = (values, meta), or with
    ``transposed`` ``x [..., n] @ W`` (W^T must then be 2:4 too): on sparse tensor cores
    where ``gpu_plan`` allows, else dense (saying so once)."""
    rows, cols = values.shape[0], 4 * meta.shape[1]
    n, k = (cols, rows) if transposed else (rows, cols)
    x2 = _rows2d(x)
    plan = gpu_plan(x2.shape[0], n, k, x.dtype, transposed)
    if plan == "compressed":
        y = torch.ops.sparsekernels_C.sparse24_mm(x2, values, meta, bias)
    elif plan == "semi_structured":
        # torch's 2:4 GEMM reads its dense operand as contiguous (or one plain transpose):
        # an expanded gradient or a column slice would be misread.
        y = _semi_structured_result(
            torch.nn.functional.linear(x2.contiguous(), _semi_structured_weight(values, meta, transposed), bias),
            x2.shape[0], n)
    else:
        _warn_once(f"{op} on the GPU runs {plan}")
        dense = _dense_24(values, meta)
        y = torch.nn.functional.linear(x2, dense.t() if transposed else dense, bias)
    return y.reshape(*x.shape[:-1], n)


def _dispatch_args_24(x: Tensor, n: int, k: int, dense_variant: bool, transposed: bool = False) -> dict:
    """The flops, shape class and candidates under which a 2:4 product of x [..., k] with
    a weight [n, k] is dispatched (``dense_variant``: as for :func:`_dispatch_24`;
    ``transposed``: the product runs on W^T, as for :func:`gpu_plan`)."""
    m = x.shape[:-1].numel()
    flops = 2.0 * m * n * k
    if (small := unmeasured_args(flops)) is not None:
        return small
    cands = None
    if x.is_cuda:
        plan = gpu_plan(m, n, k, x.dtype, transposed)
        cands = ["cuda", "reference"] if plan in ("compressed", "semi_structured") else []
    elif dense_variant:
        # Where our 2:4 kernel is not faster than the CPU's dense GEMM, run that GEMM on
        # the weight densified in C++ (the reference densifies in Python, far slower).
        cands = dense_candidates(x)
    return {"flops": flops, "key": backends.shape_class(m, n, k), "candidates": cands}


def _dispatch_24(op: str, x: Tensor, n: int, k: int, run, dense_variant: bool = False, transposed: bool = False):
    """``backends.dispatch`` for a 2:4 product of x [..., k] with a weight [n, k]; on the
    GPU, says once when measurement found dense faster than 2:4 for a shape.
    ``dense_variant``: ``run`` can also run "cpu:dense" (the weight decompressed in C++);
    ``transposed``: the product runs on W^T (the input gradient)."""
    args = _dispatch_args_24(x, n, k, dense_variant, transposed)
    out = dispatch_measured(op, x, run, args)
    if x.is_cuda and backends.measured_choice(op, x.device, x.dtype, args["key"]) == "reference":
        m = x.shape[:-1].numel()
        _warn_once(f"{op}: dense measured faster than 2:4 for x [{m}, {k}] and W [{n}, {k}] ({x.dtype}); running "
                   "dense (sparsekernels info lists the measured choices)")
    return out


def _run_forward_24(backend: str, x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ W^T + bias`` for the 2:4 weight (values, meta) on ``backend``, for checked
    arguments (the op's body and the eager route both run it)."""
    if backend == "cpu":  # the kernel adds the bias as it writes y (no second pass)
        return torch.ops.sparsekernels_C.sparse24_mm(x, values, meta, bias)
    if backend == "cpu:dense":
        return torch.ops.sparsekernels_C.sparse24_dense_mm(x, values, meta, bias)
    _checks.check_meta("sparse24_mm", meta)  # once per meta tensor; the CPU kernel checks it itself
    if x.is_cuda and backend in ("cuda", "triton"):
        return _linear_24(x, values, meta, bias, "sparse24_mm")
    return reference.sparse24_mm(x, values, meta, bias)


def _forward_24(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None, op: str = "sparse24_mm") -> Tensor:
    """:func:`_run_forward_24` on the chosen backend, measured under ``op``; on the CPU
    "auto" also tries "cpu:dense" (the weight decompressed in C++, then the dense GEMM)
    where our kernel is not faster."""
    return _dispatch_24(op, x, values.shape[0], 4 * meta.shape[1],
                        lambda backend: _run_forward_24(backend, x, values, meta, bias), dense_variant=True)


@torch.library.custom_op("sparsekernels::sparse24_mm", mutates_args=())
def _sparse24_mm_op(x: Tensor, values: Tensor, meta: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
                    t_col_idx: Tensor, t_perm: Tensor, bias: Tensor | None = None,
                    transposable: bool = False) -> Tensor:
    return _forward_24(x, values, meta, bias)


@_sparse24_mm_op.register_fake
def _(x, values, meta, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, bias=None, transposable=False):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _input_grad_24(grad: Tensor, values: Tensor, meta: Tensor, pattern: tuple) -> Tensor:
    """dx [..., k] = grad [..., n] @ W for a 2:4 weight W [n, k] whose transpose is 2:4 too
    (transposable mask): on the GPU through sparse tensor cores on W^T; elsewhere W^T's
    CSR (spmm_t)."""
    if not grad.is_cuda:
        return _spmm_t(grad, values.flatten(), *pattern)
    n, k = values.shape[0], 4 * meta.shape[1]

    def run(backend: str) -> Tensor:
        if backend in ("cuda", "triton"):
            return _linear_24(grad, values, meta, None, "sparse24_mm input gradient", transposed=True)
        return grad @ _dense_24(values, meta)

    return _dispatch_24("sparse24_mm_t", grad, k, n, run, transposed=True)


def _setup(ctx, inputs, output):
    x, values, meta, *pattern, bias, transposable = inputs
    ctx.save_for_backward(x, values, meta, *pattern)
    ctx.transposable = transposable
    ctx.has_bias = bias is not None


# --------------------------------------------------------------------------- CPU backward products
def _mm_t_24(dy: Tensor, values: Tensor, meta: Tensor) -> Tensor:
    """dx [..., k] = dy [..., n] @ W for the 2:4 weight W [n, k] = (values, meta), on the
    backend chosen for it: our kernel, which streams W's rows ("cpu": sparse24_mm_t), the
    dense GEMM of W decompressed in C++ ("cpu:dense", where measured faster: bf16 on AMX,
    large batches), or dense in PyTorch (the reference)."""
    def run(backend: str) -> Tensor:
        if backend == "cpu":
            return torch.ops.sparsekernels_C.sparse24_mm_t(dy, values, meta)
        if backend == "cpu:dense":
            return torch.ops.sparsekernels_C.sparse24_dense_mm(dy, values, meta, None, True)
        _checks.check_meta("sparse24_mm_t", meta)  # the C++ kernels check it themselves
        return reference.sparse24_mm_t(dy, values, meta)

    n, k = values.shape[0], 4 * meta.shape[1]
    return dispatch_measured("sparse24_mm_t", dy, run, _dispatch_args_24(dy, k, n, dense_variant=True))


def _sddmm_24(dy: Tensor, x: Tensor, values: Tensor, meta: Tensor) -> Tensor:
    """dvalues [n, k/2] = (dy^T x) at W's kept positions, laid out as ``values``, on the
    backend chosen for it: our kernel ("cpu": sparse24_sddmm), the dense GEMM dy^T x and a
    pick of its kept entries in C++ ("cpu:dense"), or dense in PyTorch (the reference)."""
    def run(backend: str) -> Tensor:
        if backend == "cpu":
            return torch.ops.sparsekernels_C.sparse24_sddmm(dy, x, values, meta)
        if backend == "cpu:dense":
            return torch.ops.sparsekernels_C.sparse24_dense_sddmm(dy, x, values, meta)
        _checks.check_meta("sparse24_sddmm", meta)
        return reference.sparse24_sddmm(dy, x, meta)

    n, k = values.shape[0], 4 * meta.shape[1]
    return dispatch_measured("sparse24_sddmm", dy, run, _dispatch_args_24(x, n, k, dense_variant=True))


@torch.library.custom_op("sparsekernels::sparse24_mm_t", mutates_args=())
def _sparse24_mm_t_op(dy: Tensor, values: Tensor, meta: Tensor) -> Tensor:
    return _mm_t_24(dy, values, meta)


@_sparse24_mm_t_op.register_fake
def _(dy, values, meta):
    return dy.new_empty((*dy.shape[:-1], 4 * meta.shape[1]))


@torch.library.custom_op("sparsekernels::sparse24_sddmm", mutates_args=())
def _sparse24_sddmm_op(dy: Tensor, x: Tensor, values: Tensor, meta: Tensor) -> Tensor:
    return _sddmm_24(dy, x, values, meta)


@_sparse24_sddmm_op.register_fake
def _(dy, x, values, meta):
    return values.new_empty(values.shape)


# (No autograd of their own: a backward calls them with grad mode off only.)
_sparse24_mm_t_op.register_vmap(_functorch.batching_rule(_sparse24_mm_t_op, batch_arg=0))
_sparse24_sddmm_op.register_vmap(_functorch.batching_rule(_sparse24_sddmm_op, batch_arg=None))


def _native_cpu_backward(grad: Tensor) -> bool:
    """Whether the gradients may come from the 2:4 backward products above rather than
    the CSR view's: CPU tensors, no graph of the backward wanted (those products have no
    autograd of their own; the CSR ops, which a double backward runs, do), and an
    extension that has them. The CSR view's spmm_t reads W's values in W^T's order, a
    gather that missed the TLB on every value (4096 x 4096: ~50 ms per call, against
    1.3 ms for sparse24_mm_t at one row; DEVELOPERS.md)."""
    return (grad.device.type == "cpu" and not torch.is_grad_enabled()
            and hasattr(torch.ops.sparsekernels_C, "sparse24_mm_t"))


def _backward(ctx, grad, eager: bool = False):
    """The gradients of sparse24_mm (``eager``: from ``_EagerSparse24``, see
    ``csr_matmul._spmm_backward``)."""
    x, values, meta, *pattern = ctx.saved_tensors
    gx = gv = gb = None
    flat = values.flatten()
    if _native_cpu_backward(grad):
        # From an eager backward on plain tensors, without the custom ops' dispatch (_eager).
        direct = eager and _eager.direct_call_allowed(grad, x, values)
        if ctx.needs_input_grad[0]:
            gx = (_mm_t_24 if direct else _sparse24_mm_t_op)(grad, values, meta)
        if ctx.needs_input_grad[1]:
            gv = (_sddmm_24 if direct else _sparse24_sddmm_op)(grad, x, values, meta)
    elif ctx.needs_input_grad[0] and ctx.needs_input_grad[1] and _fused_cpu_backward(grad, flat, pattern[0],
                                                                                 pattern[2]):
        # Both gradients through the CSR view in one compiled call, as SparseLinear's
        # (csr_matmul._spmm_backward): one sweep over W^T for both, or one packing of dy,
        # and the bias gradient summed while dy is packed.
        need_gb = ctx.has_bias and ctx.needs_input_grad[8]
        gx, gv, gb = fused_backward(eager, grad, x, flat)(grad, x, flat, *pattern, need_gb)
        gv = gv.view_as(values)
        if not need_gb:
            gb = None
    elif ctx.needs_input_grad[0]:
        if ctx.transposable:
            gx = _input_grad_24(grad, values, meta, tuple(pattern))
        else:
            gx = spmm_t_in_backward(grad, flat, pattern, eager)
    if ctx.needs_input_grad[1] and gv is None:
        gv = sddmm_in_backward(grad, x, pattern, eager).view_as(values)
    if ctx.has_bias and ctx.needs_input_grad[8] and gb is None:
        gb = _rows2d(grad).sum(0)
    return gx, gv, None, None, None, None, None, None, gb, None


_sparse24_mm_op.register_autograd(_backward, setup_context=_setup)


# y = x W^T + b: bilinear in (x, values), affine in the bias (argument 8).
_sparse24_mm = _functorch.routed(_sparse24_mm_op, _setup, _backward, "sparse24_mm", batch_arg=0,
                                 jvp=lambda p, t: _functorch.linear_tangent(_sparse24_mm, p, t, (0, 1), bias_slot=8,
                                                                            out_features=p[1].shape[0]))


class _EagerSparse24(torch.autograd.Function):
    """sparse24_mm on ``backend`` (one of ``_DIRECT_24``) without the custom op's dispatch
    (``_eager``), with the op's backward: used by :func:`sparse24_mm` only where the op
    would run that backend itself."""

    @staticmethod
    def forward(ctx, x, values, meta, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, bias, transposable, backend):
        # (backend last: needs_input_grad then lines up with the op's arguments.)
        _setup(ctx, (x, values, meta, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, bias, transposable), None)
        return _run_forward_24(backend, x, values, meta, bias)

    @staticmethod
    def backward(ctx, grad):
        return (*_backward(ctx, grad, eager=True), None)


# Backends the eager route runs without the custom op, by device: the compiled kernels on
# the CPU; on the GPU the compressed-form kernel, torch's 2:4 GEMM and dense (all behind
# "cuda" and "reference"), where the op's Python is a large part of a small product.
_DIRECT_24 = {"cpu": ("cpu", "cpu:dense"), "cuda": ("cuda", "reference")}


def _direct_backend_24(x: Tensor, n: int, k: int) -> str | None:
    """The backend the op would run now for x [..., k] and W [n, k] when the eager route
    may run it too (``_DIRECT_24``), else None (measuring and the rest stay in the op)."""
    backend = backends.planned("sparse24_mm", x.device, x.dtype, **_dispatch_args_24(x, n, k, dense_variant=True))
    return backend if backend in _DIRECT_24.get(x.device.type, ()) else None


def sparse24_mm(x: Tensor, values: Tensor, meta: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
                t_col_idx: Tensor, t_perm: Tensor, bias: Tensor | None = None, *,
                transposable: bool = False) -> Tensor:
    """``y [..., N] = x [..., K] @ W^T + bias`` for a 2:4 weight (values [N, K/2], meta
    [N, K/4] uint8) whose CSR view is (row_ptr, col_idx) with transpose map (t_row_ptr,
    t_col_idx, t_perm). Differentiable in ``x``, ``values`` and ``bias`` [N].

    ``transposable=True`` declares that W^T is 2:4 too (a transposable mask): on the GPU
    the input gradient then also runs on sparse tensor cores."""
    values = _checks.check_tensor("sparse24_mm", "values", values)
    meta = _checks.check_tensor("sparse24_mm", "meta", meta)
    if values.dim() != 2 or meta.dim() != 2 or values.shape[1] != 2 * meta.shape[1] or values.shape[0] != meta.shape[0]:
        raise ValueError(f"sparse24_mm: values [N, K/2] and meta [N, K/4] do not match: {tuple(values.shape)} and "
                         f"{tuple(meta.shape)}")
    if meta.dtype != torch.uint8:
        raise TypeError(f"sparse24_mm: meta must be uint8, got {meta.dtype}")
    if meta.device != values.device:
        raise ValueError(f"sparse24_mm: meta is on {meta.device} but values is on {values.device}")
    out_f, in_f = _checks.check_csr_pattern("sparse24_mm", values.flatten(), row_ptr, col_idx, t_row_ptr,
                                            t_col_idx, t_perm)
    if in_f != 4 * meta.shape[1]:
        raise ValueError(f"sparse24_mm: the transpose map has {in_f} columns, meta implies {4 * meta.shape[1]}")
    if col_idx.shape[0] != values.numel() or row_ptr.shape[0] != values.shape[0] + 1:
        raise ValueError("sparse24_mm: the CSR view must have one row per output and values.numel() entries")
    _checks.check_dense("sparse24_mm", "x", x, values, in_f)
    if bias is not None:
        _checks.check_bias("sparse24_mm", bias, values, out_f)
    if not isinstance(transposable, bool):
        raise TypeError(f"sparse24_mm: transposable must be a bool, got {type(transposable).__name__}")
    if _eager.direct_call_allowed(x, values, meta, bias) and (backend := _direct_backend_24(x, out_f, in_f)):
        # Run what the op would run, without the op's dispatch (``_eager``).
        if _eager.wants_graph(x, values, bias):
            return _EagerSparse24.apply(x, values, meta, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, bias,
                                        transposable, backend)
        return _run_forward_24(backend, x, values, meta, bias)
    return _sparse24_mm(x, values, meta, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, bias, transposable)


# The forward product alone, for SR-STE's autograd.Function (which applies its own gradient
# rule); its registered autograd is the plain gradient of the product.
@torch.library.custom_op("sparsekernels::sparse24_linear_forward", mutates_args=())
def _sparse24_forward_op(x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None = None) -> Tensor:
    return _forward_24(x, values, meta, bias, op="sparse24_linear_forward")


@_sparse24_forward_op.register_fake
def _(x, values, meta, bias=None):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _forward_setup(ctx, inputs, output):
    x, values, meta, bias = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.has_bias = bias is not None


def _forward_backward(ctx, grad):
    # The plain gradient of the product (dense; SR-STE replaces it with its own rule).
    x, values, meta = ctx.saved_tensors
    g2, x2 = _rows2d(grad), _rows2d(x)
    gx = grad @ _dense_24(values, meta) if ctx.needs_input_grad[0] else None
    gv = (g2.t() @ x2).gather(1, meta_columns(meta)) if ctx.needs_input_grad[1] else None
    gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return gx, gv, None, gb


_sparse24_forward_op.register_autograd(_forward_backward, setup_context=_forward_setup)


_sparse24_forward = _functorch.routed(
    _sparse24_forward_op, _forward_setup, _forward_backward, "sparse24_forward", batch_arg=0,
    jvp=lambda p, t: _functorch.linear_tangent(_sparse24_forward, p, t, (0, 1), bias_slot=3,
                                               out_features=p[1].shape[0]))


class _SRSTE(torch.autograd.Function):
    """y = x (W * E)^T + b; dx = dy (W * E); dW = dy^T x + lam * (1 - E) * W (dense: SR-STE
    keeps dense master weights and a dense straight-through gradient by design).

    No CSR view is needed: the mask changes every update, and rebuilding a transpose map
    (a sort of nnz entries) per step would cost more than the product. dx runs on the 2:4
    GEMM of W^T on the GPU when the mask is transposable, as a dense product otherwise."""

    # forward / setup_context kept apart, as functorch transforms (torch.func.grad) require;
    # vmap (per-sample gradients) runs forward and backward batched. The kept values come
    # in as an input (gathered by the caller, no gradient of their own): a second,
    # non-differentiable output had tripped functorch under jvp of vmap.
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, values, meta, mask, bias, lam, transposable):
        return _sparse24_forward(x, values, meta, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, values, meta, mask, bias, lam, transposable = inputs
        ctx.save_for_backward(x, weight, values, meta, mask)
        ctx.lam, ctx.transposable, ctx.has_bias = lam, transposable, bias is not None

    @staticmethod
    def backward(ctx, grad):
        x, weight, values, meta, mask = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            if grad.is_cuda and ctx.transposable:
                gx = _input_grad_24(grad, values, meta, ())
            else:
                gx = grad @ (weight * mask)
        g2 = _rows2d(grad)
        if ctx.needs_input_grad[1]:
            gw = g2.t() @ _rows2d(x)
            # In the weight's dtype, in place. lam scales the tensor, not through add_'s alpha:
            # Inductor (torch.compile's default backend, torch 2.14) dropped that alpha and
            # added 1 * W at the pruned positions.
            gw.add_(torch.where(mask, 0.0, weight * ctx.lam))
        if ctx.has_bias and ctx.needs_input_grad[5]:
            gb = g2.sum(0)
        return gx, gw, None, None, None, gb, None, None


class _SRSTEForwardMode(_SRSTE):
    """_SRSTE with its forward-mode rule, used only under functorch transforms or a
    forward-AD dual level: dynamo cannot trace a Function that defines ``jvp``."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _SRSTE.setup_context(ctx, inputs, output)
        x, _, values, meta = inputs[:4]
        ctx.save_for_forward(x, values, meta)

    @staticmethod
    def jvp(ctx, tx, tweight, _values, _meta, _mask, tbias, _lam, _transposable):
        # The straight-through Jacobian that SR-STE's backward uses (d(W * E)/dW taken as
        # the identity: a dense weight tangent); its decay term is not a derivative and
        # has no forward-mode counterpart.
        x, values, meta = ctx.saved_tensors
        t = _sparse24_forward(tx, values, meta, None) if tx is not None else None
        if tweight is not None:
            tw = torch.nn.functional.linear(x, tweight)
            t = tw if t is None else t + tw
        return _functorch.add_bias_tangent(t, tbias, x, values.shape[0])


def check_srste_lambda(owner: str, name: str, lam: object) -> float:
    """SR-STE's decay lambda_w: a finite number >= 0 (bools and strings refused), as float."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {lam!r}")
    return float(lam)


def srste_linear(x: Tensor, weight: Tensor, meta: Tensor, mask: Tensor, lam: float = 2e-4, *,
                 bias: Tensor | None = None, transposable: bool = False,
                 kept_values: Tensor | None = None) -> Tensor:
    """SR-STE product: ``x [..., K] @ (weight * mask)^T + bias`` with the 2:4 ``mask`` [N, K]
    (bool) and its metadata ``meta`` [N, K/4]; gradient to the dense ``weight`` [N, K] as in
    Zhou et al. 2021: dW = dy^T x + lam * (1 - mask) * weight. ``transposable=True``
    declares the mask 2:4 along columns too (the GPU then runs dx on the 2:4 GEMM).
    ``kept_values`` [N, K/2]: weight's current values at the mask in meta's order, when the
    caller has them (the prune + compress that produced meta returns them); else gathered.
    Checks every argument, meta's bytes and that ``mask`` holds meta's positions (the
    forward reads meta, the backward the mask: two patterns would give gradients of
    another product); ``Sparse24Linear``, whose meta and mask come from one compress,
    calls :func:`srste_product` directly."""
    weight = _checks.check_tensor("srste_linear", "weight", weight)
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"srste_linear: weight must be a 2-D floating tensor [N, K], got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] % 4:
        raise ValueError(f"srste_linear: weight's K = {weight.shape[1]} must be divisible by 4 (2:4 groups)")
    check_srste_lambda("srste_linear", "lam", lam)
    _checks.check_dense("srste_linear", "x", x, weight, weight.shape[1])
    if bias is not None:
        _checks.check_bias("srste_linear", bias, weight, weight.shape[0])
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
        raise TypeError(f"srste_linear: mask must be a bool tensor of the weight's shape {tuple(weight.shape)}")
    if not isinstance(meta, Tensor) or meta.dtype != torch.uint8 or tuple(meta.shape) != (weight.shape[0],
                                                                                           weight.shape[1] // 4):
        raise TypeError(f"srste_linear: meta must be uint8 [{weight.shape[0]}, {weight.shape[1] // 4}]")
    # kept_values is compared with the weight as the product sees them (autocast's dtype).
    x, weight, bias, kept_values = (autocast.cast(t) for t in (x, weight, bias, kept_values))
    if kept_values is not None and (not isinstance(kept_values, Tensor) or kept_values.dtype != weight.dtype
                                    or tuple(kept_values.shape) != (weight.shape[0], weight.shape[1] // 2)):
        raise TypeError(f"srste_linear: kept_values must be [{weight.shape[0]}, {weight.shape[1] // 2}] of the "
                        f"weight's dtype")
    if meta.device != weight.device or mask.device != weight.device:
        raise ValueError(f"srste_linear: meta and mask must be on the weight's device {weight.device}")
    # The contents, where they have values to read (not while tracing or under transforms).
    if not (_functorch.transforms_active() or torch.compiler.is_compiling()):
        check_meta_bytes("srste_linear", meta)
        positions = torch.zeros_like(mask).scatter(1, meta_columns(meta), True)
        if not torch.equal(positions, mask):
            raise ValueError("srste_linear: mask must hold exactly the positions meta describes")
    return srste_product(x, weight, meta, mask, lam, bias=bias, transposable=transposable, kept_values=kept_values)


def srste_product(x: Tensor, weight: Tensor, meta: Tensor, mask: Tensor, lam: float, *, bias: Tensor | None = None,
                  transposable: bool = False, kept_values: Tensor | None = None) -> Tensor:
    """:func:`srste_linear` without its checks, for a caller whose arguments are consistent
    by construction (``Sparse24Linear``: meta, mask and kept values from one compress)."""
    # SR-STE is an autograd.Function, not a custom op: under autocast it casts its operands
    # here, as the op-level rule (ops/autocast.py) does for the others, and the gradient
    # reaches the fp32 master weight through the casts.
    x, weight, bias, kept_values = (autocast.cast(t) for t in (x, weight, bias, kept_values))
    values = kept_values if kept_values is not None else weight.detach().gather(1, meta_columns(meta))
    fn = _SRSTEForwardMode if _functorch.tangents_possible() else _SRSTE
    return fn.apply(x, weight, values, meta, mask, bias, float(lam), bool(transposable))
