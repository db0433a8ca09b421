"""The layers under torch.func transforms and torch.export.

torch's own wrapper of a custom op's autograd had made ``torch.func.grad`` (and vjp,
jacrev, per-sample gradients) raise "must override the setup_context staticmethod"
through every product, and forward mode (jvp, jacfwd, hessian) had no rule
(ops/_functorch.py routes them, with a forward-mode rule per op); the BSR entry points
read index values that ``torch.export`` cannot see. Every check compares against plain autograd on
the same layer, computed independently (per sample in a loop, double backward with
create_graph)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import sparsekernels as sk

LAYERS = ["csr", "2:4", "2:4-srste", "bsr", "conv"]


def _layer(kind: str, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    if kind == "csr":
        layer, shape = sk.nn.SparseLinear(20, 12, sparsity=0.7, generator=g), (5, 20)
    elif kind == "2:4":
        layer, shape = sk.nn.Sparse24Linear(16, 12), (5, 16)
    elif kind == "2:4-srste":
        layer, shape = sk.nn.Sparse24Linear(16, 12, mode="srste"), (5, 16)
    elif kind == "bsr":
        layer, shape = sk.nn.SparseLinear(32, 16, sparsity=0.5, format="bsr", block_size=8, generator=g), (5, 32)
    else:
        layer, shape = sk.nn.SparseConv2d(3, 4, 3, padding=1, sparsity=0.5, generator=g), (5, 3, 6, 6)
    layer = layer.to(dtype)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    return layer, x


def _loss(layer, params, x):
    return functional_call(layer, params, (x,)).pow(2).sum()


def _params(layer):
    return {k: v.detach() for k, v in layer.named_parameters()}


def _autograd_grads(layer, x):
    layer.zero_grad(set_to_none=True)
    _loss(layer, dict(layer.named_parameters()), x).backward()
    return {k: v.grad.clone() for k, v in layer.named_parameters()}


@pytest.mark.parametrize("kind", LAYERS)
def test_func_grad_matches_backward(kind, seed):
    layer, x = _layer(kind, seed)
    got = grad(_loss, argnums=1)(layer, _params(layer), x)
    want = _autograd_grads(layer, x)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-10, msg=k)
    # vjp gives the input gradient too
    out, pullback = vjp(lambda xx: functional_call(layer, _params(layer), (xx,)), x)
    (gx,) = pullback(2 * out)
    xr = x.clone().requires_grad_()
    _loss(layer, _params(layer), xr).backward()
    torch.testing.assert_close(gx, xr.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", LAYERS)
def test_per_sample_gradients_match_a_loop(kind, seed):
    """vmap(grad(...)): the common functorch use (per-sample gradients, DP-SGD)."""
    layer, x = _layer(kind, seed)
    per_sample = vmap(grad(_loss, argnums=1), in_dims=(None, None, 0))(layer, _params(layer), x.unsqueeze(1))
    for i in range(x.shape[0]):
        want = _autograd_grads(layer, x[i:i + 1])
        for k in want:
            torch.testing.assert_close(per_sample[k][i], want[k], rtol=1e-9, atol=1e-10, msg=f"{k}[{i}]")


@pytest.mark.parametrize("kind", ["csr", "2:4", "bsr", "conv"])
def test_second_order_and_jacrev(kind, seed):
    layer, x = _layer(kind, seed)
    params = _params(layer)

    def input_grad_norm(xx):
        return grad(lambda z: _loss(layer, params, z))(xx).pow(2).sum()

    got = grad(input_grad_norm)(x)
    xr = x.clone().requires_grad_()
    (g1,) = torch.autograd.grad(_loss(layer, params, xr), xr, create_graph=True)
    (want,) = torch.autograd.grad(g1.pow(2).sum(), xr)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)

    x1 = x[:2]
    jac = jacrev(lambda xx: functional_call(layer, params, (xx,)))(x1)
    want_jac = torch.autograd.functional.jacobian(lambda xx: functional_call(layer, params, (xx,)), x1)
    torch.testing.assert_close(jac, want_jac, rtol=1e-10, atol=1e-10)


def test_bf16_conv_input_gradient_under_grad(seed):
    """The fp16 / bf16 convolution's fp32 input gradient (conv._Fp32InputGrad) under grad."""
    layer, x = _layer("conv", seed, dtype=torch.bfloat16)
    params = _params(layer)
    got = grad(lambda xx: _loss(layer, params, xx))(x)
    xr = x.clone().requires_grad_()
    _loss(layer, params, xr).backward()
    torch.testing.assert_close(got, xr.grad, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["csr", "2:4", "bsr"])
def test_vmap_folds_the_batch_into_one_call(kind, seed):
    """vmap over the input runs the op once (its batching rule), without torch's
    per-entry fallback and its warning; vmap over the weight runs per entry."""
    layer, x = _layer(kind, seed)
    params = _params(layer)
    xs = torch.stack([x, 2 * x, -x])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback's "performance drop" warning
        got = vmap(lambda xx: functional_call(layer, params, (xx,)))(xs)
    torch.testing.assert_close(got, torch.stack([layer(xx) for xx in xs]).detach(), rtol=1e-12, atol=1e-12)
    name = "values"
    stacked = {**params, name: torch.stack([params[name], 0.5 * params[name]])}
    got_w = vmap(lambda p: functional_call(layer, {**params, name: p}, (x,)))(stacked[name])
    torch.testing.assert_close(got_w[1], 0.5 * (got_w[0] - (params["bias"] if "bias" in params else 0))
                               + (params["bias"] if "bias" in params else 0), rtol=1e-12, atol=1e-12)
    none = vmap(lambda p: functional_call(layer, {**params, name: p}, (x,)))(stacked[name][:0])
    assert none.shape == (0, *got_w.shape[1:])


@pytest.mark.parametrize("kind", LAYERS)
def test_export_runs_the_ops(kind, seed):
    """torch.export of a model holding the layer: the exported program calls our op and
    matches eager. (A Sparse24Linear exported as the root module cannot be unlifted by
    ``ep.module()``: its ``meta`` buffer collides with GraphModule.meta; nested, as in any
    real model, it can.)"""
    layer, x = _layer(kind, seed, dtype=torch.float32)
    model = torch.nn.Sequential(layer, torch.nn.ReLU()).eval()
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("sparsekernels.") for t in targets), targets
    torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-6, atol=1e-6)
    x2 = torch.randn_like(x)
    torch.testing.assert_close(ep.module()(x2), model(x2), rtol=1e-6, atol=1e-6)


def test_bsr_bad_indices_still_raise_from_the_op(seed):
    """The BSR index check moved into the op's body: a bad pattern is still a ValueError."""
    layer, x = _layer("bsr", seed)
    bad = layer.ccol.clone()
    bad[0] = 99
    with pytest.raises(ValueError, match="ccol"):
        sk.ops.bsr_mm(x, layer.values, layer.crow, bad, layer.t_crow, layer.t_ccol, layer.t_perm)


def test_fx_symbolic_trace_keeps_the_layers_as_leaves(seed):
    """torch.fx's own symbolic_trace cannot enter the layers (their input checks meet a
    Proxy); sparsekernels.nn.symbolic_trace keeps them as call_module nodes."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        sk.nn.SparseConv2d(3, 4, 3, sparsity=0.5, generator=g), torch.nn.ReLU(), torch.nn.Flatten(),
        sk.nn.SparseLinear(64, 16, sparsity=0.8, generator=g), sk.nn.Sparse24Linear(16, 8),
        sk.nn.SparseLinear(8, 8, sparsity=0.5, format="bsr", block_size=4, generator=g))
    gm = sk.nn.symbolic_trace(model)
    leaves = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert leaves == ["0", "1", "2", "3", "4", "5"]
    x = torch.randn(2, 3, 6, 6, generator=g)
    assert torch.equal(gm(x), model(x))
    for layer in (model[3], model[4], model[5]):  # torch.fx's own: an error that says what to use
        with pytest.raises(TypeError, match="sparsekernels.nn.symbolic_trace"):
            torch.fx.symbolic_trace(torch.nn.Sequential(layer))


@pytest.mark.parametrize("kind", ["csr", "2:4", "bsr", "conv"])
@pytest.mark.parametrize("batched", ["x", "values"])
def test_grad_of_vmap(kind, batched, seed):
    """grad outside, vmap inside (a loss summed over a vmapped forward): the op's batching
    rule runs with the grad level still wrapped around it."""
    layer, x = _layer(kind, seed)
    params = _params(layer)
    if batched == "x":
        def loss(p):
            return vmap(lambda xx: functional_call(layer, p, (xx,)))(x.unsqueeze(1)).pow(2).sum()
        want = _autograd_grads(layer, x)
    else:
        scales = torch.tensor([1.0, -0.5, 2.0], dtype=x.dtype)

        def loss(p):
            stacked = p["values"] * scales.reshape(-1, *([1] * p["values"].dim()))
            ys = vmap(lambda v: functional_call(layer, {**p, "values": v}, (x,)))(stacked)
            return ys.pow(2).sum()
        want = {k: torch.zeros_like(v) for k, v in params.items()}
        for s in scales.tolist():
            with torch.no_grad():
                scaled = {**params, "values": params["values"] * s}
            p = {k: v.clone().requires_grad_() for k, v in scaled.items()}
            g = torch.autograd.grad(_loss(layer, p, x), list(p.values()))
            for k, gk in zip(p, g):
                want[k] += gk * (s if k == "values" else 1.0)
    got = grad(loss)(params)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-10, msg=k)


def test_srste_under_transforms_keeps_the_layer_buffers_plain(seed):
    """SR-STE's mask update is a buffer write: skipped inside functorch transforms, so no
    wrapped tensor is left in the layer (it could not be copied or saved afterwards)."""
    layer, x = _layer("2:4-srste", seed)
    meta = layer.meta.clone()
    grad(_loss, argnums=1)(layer, {k: v.detach() * 1.5 for k, v in layer.named_parameters()}, x)
    vmap(grad(_loss, argnums=1), in_dims=(None, None, 0))(layer, _params(layer), x.unsqueeze(1))
    assert not torch._C._functorch.is_functorch_wrapped_tensor(layer.meta)
    assert not torch._C._functorch.is_functorch_wrapped_tensor(layer.stored_mask)
    assert torch.equal(layer.meta, meta)
    copy.deepcopy(layer)
    layer(x).sum().backward()  # outside transforms the update runs again


def test_symbolic_trace_of_a_function():
    gm = sk.nn.symbolic_trace(lambda x: x.relu() + 1)
    x = torch.randn(4)
    assert torch.equal(gm(x), x.relu() + 1)


@pytest.mark.parametrize("kind", ["csr", "2:4", "bsr", "conv"])
def test_forward_mode_matches_autograd(kind, seed):
    """jvp in the input and in the parameters against torch.autograd.functional.jvp (the
    double-backward trick: reverse mode only), jacfwd against the reverse-mode Jacobian,
    and hessian (forward over reverse) against autograd's."""
    layer, x = _layer(kind, seed)
    params = _params(layer)
    g = torch.Generator().manual_seed(seed + 1)
    tx = torch.randn(x.shape, generator=g, dtype=x.dtype)
    f = lambda xx: functional_call(layer, params, (xx,))  # noqa: E731
    y, ty = jvp(f, (x,), (tx,))
    torch.testing.assert_close(ty, torch.autograd.functional.jvp(f, x, tx)[1], rtol=1e-10, atol=1e-10)
    tp = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    h = lambda pp: functional_call(layer, pp, (x,))  # noqa: E731
    _, typ = jvp(h, (params,), (tp,))
    want = torch.autograd.functional.jvp(lambda *vs: h(dict(zip(params, vs))), tuple(params.values()),
                                         tuple(tp.values()))[1]
    torch.testing.assert_close(typ, want, rtol=1e-10, atol=1e-10)
    x1 = x[:1]
    torch.testing.assert_close(jacfwd(f)(x1), torch.autograd.functional.jacobian(f, x1), rtol=1e-10, atol=1e-10)
    loss = lambda xx: f(xx).pow(3).sum()  # noqa: E731
    torch.testing.assert_close(hessian(loss)(x1), torch.autograd.functional.hessian(loss, x1), rtol=1e-9,
                               atol=1e-9)


def test_srste_forward_mode_is_the_straight_through_jacobian(seed):
    """SR-STE's forward-mode rule: the product's for the input and the bias, and for the
    weight the straight-through Jacobian its backward uses (a dense weight tangent: x tW^T;
    the decay term is not a derivative)."""
    layer, x = _layer("2:4-srste", seed)
    layer.eval()
    params = _params(layer)
    g = torch.Generator().manual_seed(seed + 1)
    tx = torch.randn(x.shape, generator=g, dtype=x.dtype)
    tw = torch.randn(params["weight"].shape, generator=g, dtype=x.dtype)
    tb = torch.randn(params["bias"].shape, generator=g, dtype=x.dtype)
    w_kept = params["weight"] * layer.mask()
    f = lambda xx, w, b: functional_call(layer, {"weight": w, "bias": b}, (xx,))  # noqa: E731
    _, t = jvp(f, (x, params["weight"], params["bias"]), (tx, tw, tb))
    torch.testing.assert_close(t, tx @ w_kept.t() + x @ tw.t() + tb, rtol=1e-10, atol=1e-10)


def test_bf16_conv_hessian_through_the_fp32_bridge(seed):
    """Forward over reverse through the bf16 convolution's bridge (conv._Fp32InputGrad):
    its product runs on a detached unfold, so x's tangent must enter in the bridge's rule.
    For y affine in x the Hessian of sum(y^2) is 2 J^T J: against the float64 layer."""
    layer, x = _layer("conv", seed, dtype=torch.bfloat16)
    x = x[:1]
    exact = copy.deepcopy(layer).double()
    params, params64 = _params(layer), _params(exact)
    got = hessian(lambda xx: functional_call(layer, params, (xx,)).float().pow(2).sum())(x)
    want = hessian(lambda xx: functional_call(exact, params64, (xx,)).pow(2).sum())(x.double())
    assert want.abs().max() > 0
    torch.testing.assert_close(got.double(), want, rtol=0.05, atol=0.05 * float(want.abs().max()))


@pytest.mark.parametrize("kind", LAYERS)
def test_forward_ad_dual_tensors(kind, seed):
    """torch.autograd.forward_ad (dual tensors, no functorch) through the layer, against
    the reverse-mode jvp; outside the dual level the eager path is back."""
    import torch.autograd.forward_ad as fwAD

    layer, x = _layer(kind, seed)
    layer.eval()
    tx = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 2), dtype=x.dtype)
    with fwAD.dual_level():
        y = layer(fwAD.make_dual(x, tx))
        primal, tangent = fwAD.unpack_dual(y)
    f = lambda xx: layer(xx)  # noqa: E731
    want_y, want_t = torch.autograd.functional.jvp(f, x, tx)
    torch.testing.assert_close(primal, want_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tangent, want_t, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["csr", "2:4", "conv"])
def test_forward_mode_without_bias(kind, seed):
    """A product called with bias=None: the forward-mode rule must not take the missing
    bias for a saved tensor."""
    g = torch.Generator().manual_seed(seed)
    if kind == "csr":
        layer, x = sk.nn.SparseLinear(20, 12, bias=False, sparsity=0.7, generator=g), torch.randn(4, 20)
    elif kind == "2:4":
        layer, x = sk.nn.Sparse24Linear(16, 12, bias=False), torch.randn(4, 16)
    else:
        layer, x = sk.nn.SparseConv2d(3, 4, 3, bias=False, sparsity=0.5, generator=g), torch.randn(2, 3, 5, 5)
    layer, x = layer.double(), x.double()
    tx = torch.randn_like(x)
    _, t = jvp(layer, (x,), (tx,))
    torch.testing.assert_close(t, torch.autograd.functional.jvp(layer, x, tx)[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["2:4-srste", "conv-bf16", "supermask"])
def test_compile_fullgraph_of_the_custom_functions(kind, seed):
    """The Functions with a forward-mode rule are applied only where tangents are possible:
    dynamo cannot trace a Function that defines jvp, and fullgraph compiles must keep
    working for SR-STE, the bf16 conv bridge and the supermask sampler."""
    torch._dynamo.reset()
    if kind == "2:4-srste":
        layer, x = _layer("2:4-srste", seed, dtype=torch.float32)  # the mask update included
    elif kind == "conv-bf16":
        layer, x = _layer("conv", seed, dtype=torch.bfloat16)
        x.requires_grad_()
    else:
        from sparsekernels.methods.supermask import _BernoulliSTE

        p = torch.full((8,), 0.5, requires_grad=True)
        compiled = torch.compile(lambda q: _BernoulliSTE.apply(q, None), backend="aot_eager", fullgraph=True)
        compiled(p).sum().backward()
        assert torch.equal(p.grad, torch.ones(8))
        return
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.float().square().sum().backward()
    eager_x = x.detach().clone().requires_grad_(x.requires_grad)
    eager(eager_x).float().square().sum().backward()
    torch.testing.assert_close(y, eager(x.detach()), rtol=1e-2, atol=1e-2)
    for (k, a), b in zip(layer.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-2, atol=2e-2, msg=k)


def test_srste_jvp_of_vmap_over_the_weight(seed):
    layer, x = _layer("2:4-srste", seed)
    layer.eval()
    params = _params(layer)
    ws = torch.stack([params["weight"], 2 * params["weight"]])
    tws = torch.randn_like(ws)
    f = lambda w: functional_call(layer, {**params, "weight": w}, (x,))  # noqa: E731
    _, t = jvp(vmap(f), (ws,), (tws,))
    for i in range(2):
        torch.testing.assert_close(t[i], x @ tws[i].t(), rtol=1e-10, atol=1e-10)


def test_capture_skipped_inside_transforms(seed):
    """Topology capture (dy^T x scores) keeps only plain tensors: nothing from inside
    torch.func.grad."""
    layer, x = _layer("csr", seed)
    layer.capture_next(True)
    grad(_loss, argnums=1)(layer, _params(layer), x)
    assert all(not torch._C._functorch.is_functorch_wrapped_tensor(t)
               for slot in layer._captured for t in slot if t is not None)


@pytest.mark.parametrize("kind", ["csr", "2:4"])
def test_compiled_transforms_match_eager(kind, seed):
    """torch.compile around torch.func.grad / jvp: dynamo cannot follow the routed levels
    (it had recursed without end) and the raw op has no forward rule (a compiled jvp had
    given a zero tangent), so the transform runs eagerly around the product: same values."""
    torch._dynamo.reset()
    layer, x = _layer(kind, seed, dtype=torch.float32)
    params = _params(layer)
    tx = torch.randn_like(x)
    g_eager = grad(_loss, argnums=1)(layer, params, x)
    g_comp = torch.compile(lambda p, xx: grad(_loss, argnums=1)(layer, p, xx), backend="aot_eager")(params, x)
    for k in g_eager:
        torch.testing.assert_close(g_comp[k], g_eager[k], rtol=1e-5, atol=1e-5, msg=k)
    f = lambda xx: functional_call(layer, params, (xx,))  # noqa: E731
    t_eager = jvp(f, (x,), (tx,))[1]
    t_comp = torch.compile(lambda xx, tt: jvp(f, (xx,), (tt,))[1], backend="aot_eager")(x, tx)
    torch.testing.assert_close(t_comp, t_eager, rtol=1e-5, atol=1e-5)
    assert t_eager.abs().max() > 0


@pytest.mark.skipif(not sk._extension.compiled(), reason="the compiled 2:4 compress op")
def test_srste_training_compiles_fullgraph_with_its_mask_updates(seed):
    """SR-STE's forward prunes and compresses (a compiled op called from Python, with a
    fake kernel for tracing): three compiled training steps against eager, masks included."""
    torch._dynamo.reset()
    layer, x = _layer("2:4-srste", seed, dtype=torch.float32)
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    masks = []
    for _ in range(3):
        for m, run in ((layer, compiled), (eager, eager)):
            run(x).square().sum().backward()
            with torch.no_grad():
                m.weight -= 0.5 * m.weight.grad
            m.weight.grad = None
        assert torch.equal(layer.meta, eager.meta)
        torch.testing.assert_close(layer.weight, eager.weight, rtol=1e-5, atol=1e-6)
        masks.append(layer.mask())
    assert not all(torch.equal(masks[0], m) for m in masks[1:])  # the mask did move


@pytest.mark.skipif(not sk._extension.compiled(), reason="the compiled 2:4 compress op")
def test_srste_compiled_by_inductor_matches_eager(seed):
    """torch.compile's default backend on SR-STE's backward: Inductor had dropped the alpha
    of ``gw.add_(..., alpha=lam)`` and added 1 * W at the pruned positions."""
    from sparsekernels.nn import Sparse24Linear

    torch._dynamo.reset()
    torch.manual_seed(seed)
    layer = Sparse24Linear(16, 8, mode="srste", srste_lambda=0.5)
    eager = copy.deepcopy(layer)
    x = torch.randn(3, 16)
    torch.compile(layer)(x).square().sum().backward()
    eager(x).square().sum().backward()
    pruned = ~eager.mask()
    assert pruned.any() and eager.weight.grad[pruned].abs().max() > 0
    torch.testing.assert_close(layer.weight.grad, eager.weight.grad, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.skipif(not sk._extension.compiled(), reason="the compiled 2:4 compress op")
@pytest.mark.parametrize("update_every", [1, 3])
def test_srste_compiled_training_does_not_recompile_per_step(update_every):
    """SR-STE's forward count was a Python int each compiled graph guarded on: a recompile
    per step, then (past the recompile limit) the whole model ran uncompiled. Now one graph
    for update_every = 1; a graph break, not a guard, where the count decides (3); the mask
    updates as in eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from sparsekernels.nn import Sparse24Linear

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(Sparse24Linear(16, 16, mode="srste", update_every=update_every), nn.ReLU(),
                          nn.Linear(16, 4))
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    for _ in range(8):
        x = torch.randn(3, 16)
        for m, run in ((model, compiled), (eager, eager)):
            run(x).square().sum().backward()
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.5 * p.grad
                    p.grad = None
        assert torch.equal(model[0].meta, eager[0].meta)
    assert model[0]._forwards == eager[0]._forwards == 8
    assert counter.frame_count <= (1 if update_every == 1 else 3), counter.frame_count
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["csr", "2:4", "bsr", "conv"])
def test_gradcheck_every_mode(kind, seed):
    """torch.autograd.gradcheck with forward AD and batched (vmapped) gradients, and
    gradgradcheck forward over reverse, in float64 against finite differences."""
    from torch.autograd import gradcheck, gradgradcheck

    layer, x = _layer(kind, seed)
    x = x[:2]
    names = [k for k, _ in layer.named_parameters()]
    inputs = (x.clone().requires_grad_(),) + tuple(v.detach().clone().requires_grad_()
                                                   for _, v in layer.named_parameters())

    def f(xx, *ps):
        return functional_call(layer, dict(zip(names, ps)), (xx,))

    assert gradcheck(f, inputs, check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True)
    assert gradgradcheck(f, inputs, check_fwd_over_rev=True, check_batched_grad=True)


def test_srste_count_survives_a_change_of_update_every():
    """The count runs on the device for update_every = 1 and on the host for more: switching
    between them (and setting it, as a resumed method does) keeps one count."""
    from sparsekernels.nn import Sparse24Linear

    torch.manual_seed(0)
    layer = Sparse24Linear(16, 8, mode="srste")
    x = torch.randn(3, 16)
    for _ in range(3):
        layer(x).sum().backward()
    layer.update_every = 2
    masks = []
    for _ in range(4):  # forwards 3, 4, 5, 6: prunes at 4 and 6 only
        before = layer.meta.clone()
        with torch.no_grad():
            layer.weight.mul_(torch.rand_like(layer.weight) + 0.5)  # moves the magnitudes
        layer(x).sum().backward()
        masks.append(not torch.equal(before, layer.meta))
    assert layer._forwards == 7
    assert masks[0] is False and masks[2] is False  # 3 and 5: no update
    layer._forwards = 10
    layer(x).sum().backward()
    assert layer._forwards == 11
