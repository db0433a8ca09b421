"""The eager path (ops/_eager.py): spmm and sparse24_mm called from Python run the
compiled kernel without the custom op's dispatch where the op would run that kernel
anyway (the CUDA side of it: tests/test_cuda.py).

It must give the op's bits (forward, every gradient, double backward), and step aside
(the custom op runs) wherever the op provides something: autocast, a forced or measured
other backend, an unmeasured product that must be measured first, tracing, a mode."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sparsekernels as sk
from sparsekernels import backends, ops
from sparsekernels.ops import _eager, csr_matmul, sparse24

from conftest import make_csr

pytestmark = pytest.mark.skipif(not sk._extension.compiled(), reason="the eager path runs the compiled kernels")


def _count_op_calls(monkeypatch, module, name):
    """Wraps ``module.name`` (a custom op's routed caller) so that its calls are counted."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def _csr_case(batch, out_f, in_f, sparsity, dtype, seed, empty_rows=False):
    csr = make_csr(out_f, in_f, sparsity, dtype, seed, empty_rows=empty_rows)
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(*batch, in_f, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(out_f, generator=g, dtype=torch.float64).to(dtype)
    return csr, x, bias


def _grads(fn, x, values, bias):
    """(y, dx, dvalues, dbias) of fn(x, values, bias) under a fixed random output gradient."""
    x, values, bias = (t.detach().clone().requires_grad_() for t in (x, values, bias))
    y = fn(x, values, bias)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(y.dtype)
    gx, gv, gb = torch.autograd.grad(y, (x, values, bias), dy)
    return y.detach(), gx, gv, gb


def _route_gives_the_ops_bits(entry, op, x, values, bias, calls, backend=None):
    """``entry(x, v, b)`` (a public entry point) runs without the custom op (``calls``, the
    op's counted callers, stays empty) and gives ``op(x, v, b)``'s bits: the output and
    every gradient. Returns the entry's (y, dx, dvalues, dbias)."""
    with backends.use_backend(backend):
        fast = _grads(entry, x, values, bias)
        assert not calls  # the eager route ran
        via_op = _grads(op, x, values, bias)
    for name, a, b in zip(("y", "dx", "dvalues", "dbias"), fast, via_op):
        assert torch.equal(a, b), name
    return fast


def _spmm_pair(p):
    """(ops.spmm, the custom op) on the pattern ``p``, as f(x, values, bias)."""
    return (lambda x, v, b: ops.spmm(x, v, *p, b)), (lambda x, v, b: torch.ops.sparsekernels.spmm(x, v, *p, b))


def _sparse24_case(dtype, batch, seed):
    """(layer, x, (ops.sparse24_mm, the custom op) as f(x, values, bias)) for a 2:4 layer
    64 -> 40 pruned from a random dense one."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(64, 40, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 64, generator=g))
    layer = sk.nn.Sparse24Linear.from_dense(lin)
    x = torch.randn(*batch, 64, generator=g).to(dtype)
    p = (layer.row_ptr, layer.col_idx, layer.t_row_ptr, layer.t_col_idx, layer.t_perm)
    pair = tuple((lambda op: lambda x, v, b: op(x, v, layer.meta, *p, b))(op)
                 for op in (ops.sparse24_mm, torch.ops.sparsekernels.sparse24_mm))
    return layer, x, pair


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch,out_f,in_f,sparsity,empty_rows", [
    ((1,), 33, 70, 0.9, False), ((2, 3), 40, 17, 0.5, True), ((64,), 48, 96, 0.0, False),
    ((5,), 31, 65, 0.99, True), ((300,), 130, 70, 0.8, False),
])
def test_eager_spmm_gives_the_ops_bits(monkeypatch, dtype, batch, out_f, in_f, sparsity, empty_rows):
    csr, x, bias = _csr_case(batch, out_f, in_f, sparsity, dtype, seed=out_f + in_f, empty_rows=empty_rows)
    p = csr.pattern()
    calls = _count_op_calls(monkeypatch, csr_matmul, "_spmm")
    fast = _route_gives_the_ops_bits(*_spmm_pair(p), x, csr.values, bias, calls, "cpu")
    with torch.no_grad(), backends.use_backend("cpu"):
        assert torch.equal(ops.spmm(x, csr.values, *p, bias), fast[0])
    assert not calls


@pytest.mark.parametrize("needs", [(True, False), (False, True), (True, True)])
def test_eager_spmm_backward_with_one_gradient_wanted(needs):
    """The first layer of a network (x needs no gradient) and a frozen weight."""
    csr, x, bias = _csr_case((9,), 24, 40, 0.7, torch.float32, seed=5)
    p = csr.pattern()
    want_x, want_v = needs

    def grads(fn):
        xs, vs = x.clone().requires_grad_(want_x), csr.values.detach().clone().requires_grad_(want_v)
        y = fn(xs, vs)
        inputs = [t for t, w in ((xs, want_x), (vs, want_v)) if w]
        return torch.autograd.grad(y, inputs, torch.ones_like(y))

    fast = grads(lambda xs, vs: ops.spmm(xs, vs, *p, bias))
    via_op = grads(lambda xs, vs: torch.ops.sparsekernels.spmm(xs, vs, *p, bias))
    assert all(torch.equal(a, b) for a, b in zip(fast, via_op))


def test_eager_spmm_double_backward_and_gradcheck():
    """A graph of the backward (create_graph) goes through the custom ops' autograd."""
    csr, x, bias = _csr_case((4,), 9, 13, 0.6, torch.float64, seed=11)
    p = csr.pattern()
    args = (x.requires_grad_(), csr.values.detach().requires_grad_(), bias.requires_grad_())
    assert _eager.direct_call_allowed(*args)
    f = lambda x, v, b: ops.spmm(x, v, *p, b)  # noqa: E731
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_eager_path_steps_aside_where_the_op_is_needed(monkeypatch):
    csr, x, bias = _csr_case((6,), 20, 30, 0.8, torch.float32, seed=2)
    p = csr.pattern()
    calls = _count_op_calls(monkeypatch, csr_matmul, "_spmm")
    ops.spmm(x, csr.values, *p, bias)
    assert len(calls) == 0
    with backends.use_backend("reference"):  # a forced other backend
        ops.spmm(x, csr.values, *p, bias)
    assert len(calls) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the op's autocast rule casts
        assert ops.spmm(x, csr.values, *p, bias).dtype == torch.bfloat16
    assert len(calls) == 2
    with FlopCounterMode(display=False):  # a dispatch mode must see the op
        ops.spmm(x, csr.values, *p, bias)
    assert len(calls) == 3
    traced = torch.jit.trace(lambda a: ops.spmm(a, csr.values, *p, bias), (x,), check_trace=False)
    assert len(calls) == 4  # torch.jit.trace records the op, not a Python Function
    torch.testing.assert_close(traced(x + 1), ops.spmm(x + 1, csr.values, *p, bias))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # tracing keeps the op
    ops.spmm(x, csr.values, *p, bias)
    assert len(calls) == 5


def test_eager_path_waits_for_a_measurement(monkeypatch):
    """A product large enough to be measured goes through the op until its class is
    measured; then, if the C++ kernel won, the eager path runs it."""
    monkeypatch.setattr(backends, "MEASURE_MIN_FLOPS", 1.0)
    monkeypatch.setattr(backends, "_measured", {})
    csr, x, bias = _csr_case((8,), 32, 48, 0.9, torch.float32, seed=4)
    p = csr.pattern()
    calls = _count_op_calls(monkeypatch, csr_matmul, "_spmm")
    ops.spmm(x, csr.values, *p, bias)
    assert len(calls) == 1
    choice = [e["choice"] for e in backends.measured() if e["op"] == "spmm"]
    assert len(choice) == 1
    ops.spmm(x, csr.values, *p, bias)
    assert len(calls) == (1 if choice[0] in csr_matmul._DIRECT["cpu"] else 2)


def test_eager_path_runs_the_measured_dense_variant(monkeypatch):
    """A class measured for "cpu:dense" (the densified weight's GEMM) runs that compiled
    kernel without the op too, with the op's bits, gradients included."""
    monkeypatch.setattr(backends, "MEASURE_MIN_FLOPS", 1.0)
    monkeypatch.setattr(backends, "_measured", {})
    csr, x, bias = _csr_case((8,), 32, 48, 0.2, torch.float32, seed=9)
    p = csr.pattern()
    args = csr_matmul._dispatch_args(x, p[0], p[2], csr.nnz, dense_variant=True)
    full_key = ("spmm", "cpu", "float32", *args["key"])
    backends._measured[full_key] = {"op": "spmm", "device": "cpu", "dtype": "float32", "key": args["key"],
                                    "choice": "cpu:dense", "times_ms": {}, "rejected": {}}
    calls = _count_op_calls(monkeypatch, csr_matmul, "_spmm")
    _route_gives_the_ops_bits(*_spmm_pair(p), x, csr.values, bias, calls)


def test_direct_call_allowed_refuses_other_devices_subclasses_and_transforms():
    x = torch.randn(3)
    assert _eager.direct_call_allowed(x, None, torch.nn.Parameter(x.clone()))
    assert not _eager.direct_call_allowed(x, torch.randn(3, device="meta"))
    assert not _eager.direct_call_allowed(torch.randn(3, device="meta"))
    assert _eager.direct_call_allowed(None, None)

    class Sub(torch.Tensor):
        pass

    assert not _eager.direct_call_allowed(x, x.as_subclass(Sub))
    seen = []
    torch.func.grad(lambda t: (seen.append(_eager.direct_call_allowed(t)), t.sum())[1])(x)
    assert seen == [False]


@pytest.mark.parametrize("fmt", ["csr", "2:4"])
def test_no_graph_where_autograd_is_off_at_the_dispatcher(fmt):
    """Inference mode with grad mode switched back on, or a call below autograd (as from
    another op's kernel): the custom op records no graph there, nor does nn.Linear, so the
    eager path must not either (it built one, and the parameters' .grad became inference
    tensors that broke the next training step)."""
    layer = (sk.nn.SparseLinear(32, 24, sparsity=0.9, generator=torch.Generator().manual_seed(0)) if fmt == "csr"
             else sk.nn.Sparse24Linear(32, 24))
    dense = torch.nn.Linear(32, 24)
    x = torch.randn(5, 32)
    want = layer(x).detach()
    for guard in (lambda: torch.inference_mode(), lambda: torch._C._AutoDispatchBelowAutograd()):
        with guard(), torch.enable_grad():
            y = layer(x)
            assert y.requires_grad == dense(x).requires_grad is False and y.grad_fn is None
            assert torch.equal(y, want)
    layer(x).sum().backward()  # an ordinary step afterwards
    assert layer.values.grad is not None and not layer.values.grad.is_inference()


def test_layer_capture_hook_sees_dy_on_the_eager_path():
    """Topology updates capture (x, dy) through a hook on the product's backward node."""
    layer = sk.nn.SparseLinear(24, 16, sparsity=0.75, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 24)
    layer.capture_next()
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    cx, cdy = layer.captured()
    assert torch.equal(cx, x) and torch.equal(cdy, dy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [(1,), (3, 5), (70,)])
def test_eager_sparse24_gives_the_ops_bits(monkeypatch, dtype, batch):
    layer, x, pair = _sparse24_case(dtype, batch, seed=len(batch) * 10 + batch[0])
    calls = _count_op_calls(monkeypatch, sparse24, "_sparse24_mm")
    _route_gives_the_ops_bits(*pair, x, layer.values, layer.bias, calls, "cpu")


def test_eager_route_of_the_gpu_backends_on_cpu_tensors(monkeypatch):
    """On CUDA the eager route also runs the Triton / reference backends (csr_matmul._DIRECT).
    The same Python runs here on CPU tensors with the reference admitted for the CPU:
    forward, both backward products and the bias gradient come out of the direct route
    with the op's bits."""
    monkeypatch.setitem(csr_matmul._DIRECT, "cpu", ("cpu", "cpu:dense", "reference"))
    csr, x, bias = _csr_case((3, 5), 33, 70, 0.8, torch.float64, seed=21, empty_rows=True)
    p = csr.pattern()
    calls = []
    for name in ("_spmm", "_spmm_t", "_sddmm"):
        real = getattr(csr_matmul, name)
        monkeypatch.setattr(csr_matmul, name, lambda *a, real=real, **k: (calls.append(name), real(*a, **k))[1])
    _route_gives_the_ops_bits(*_spmm_pair(p), x, csr.values, bias, calls, "reference")


def test_eager_route_of_the_gpu_2to4_backends_on_cpu_tensors(monkeypatch):
    """On CUDA the 2:4 eager route also runs "cuda" (compressed kernel, torch's 2:4 GEMM or
    dense) and the reference (sparse24._DIRECT_24). Its Python on CPU tensors, with the
    reference admitted for the CPU: the op's bits, every gradient included."""
    monkeypatch.setitem(sparse24._DIRECT_24, "cpu", ("cpu", "cpu:dense", "reference"))
    layer, x, pair = _sparse24_case(torch.float64, (3, 5), seed=3)
    calls = _count_op_calls(monkeypatch, sparse24, "_sparse24_mm")
    _route_gives_the_ops_bits(*pair, x, layer.values, layer.bias, calls, "reference")
