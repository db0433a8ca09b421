"""End to end: sparsified models train, and run under torch.compile."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekernels import SparseLinear, sparsify


def _mlp(in_f=32, hidden=128, out_f=10):
    return nn.Sequential(nn.Linear(in_f, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out_f))


def _task(kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=g)
    if kind == "regression":  # a linear teacher, unit-variance targets
        a = torch.randn(32, 10, generator=g) / 32**0.5
        return x, x @ a, F.mse_loss
    # classification: the argmax of a random linear teacher (10 classes)
    teacher = torch.randn(32, 10, generator=g)
    return x, (x @ teacher).argmax(1), F.cross_entropy


def _optimizer(name, params):
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.3, momentum=0.9)
    return torch.optim.Adam(params, lr=1e-2)


@pytest.mark.parametrize("task", ["regression", "classification"])
@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
def test_sparse_mlp_trains(backend, opt_name, task, seed):
    torch.manual_seed(seed)
    model = sparsify(_mlp(), 0.9)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 3
    # Sparse training from scratch: re-initialise for the kept fan-in (magnitude pruning a
    # fresh dense init keeps weights scaled for the dense fan-in, so activations would
    # shrink by ~sqrt(density) per layer).
    for layer in layers:
        layer.reset_parameters()
    masks = [m.mask().clone() for m in layers]
    x, y, loss_fn = _task(task, seed)
    opt = _optimizer(opt_name, model.parameters())
    with torch.no_grad():
        initial = loss_fn(model(x), y).item()
    for _ in range(60):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = loss_fn(model(x), y).item()
    assert final < 0.5 * initial, f"loss {initial:.4f} -> {final:.4f}"
    # the pattern did not move, and nothing grew outside it
    for layer, mask in zip(layers, masks):
        assert torch.equal(layer.mask(), mask)
        assert not layer.to_dense().weight[~mask].any()
        assert layer.values.numel() == int(mask.sum())


def test_torch_compile_matches_eager(seed):
    """One compiled model (inductor, falling back to aot_eager if inductor is unusable or
    slower than 60 s to compile here): forward and backward equal eager mode."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = sparsify(_mlp(16, 32, 8), 0.9)
    compiled_model = copy.deepcopy(model)
    x = torch.randn(12, 16)
    g = torch.randn(12, 8)

    y_eager = model(x)

    backend_used = "inductor"
    start = time.perf_counter()
    try:
        compiled = torch.compile(compiled_model, backend="inductor", fullgraph=True)
        y_comp = compiled(x)
        elapsed = time.perf_counter() - start
    except Exception as exc:  # no working C++ toolchain for inductor
        elapsed = float("inf")
        inductor_error = exc
    if elapsed > 60:
        backend_used = "aot_eager"
        torch._dynamo.reset()
        compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
        y_comp = compiled(x)
    print(f"torch.compile backend {backend_used}, inductor compile {elapsed:.1f}s")
    if elapsed == float("inf"):
        print(f"inductor failed: {inductor_error!r}")

    torch.testing.assert_close(y_comp, y_eager, atol=1e-5, rtol=1e-5)

    # backward under compile: input and parameter gradients equal eager's
    xe = x.clone().requires_grad_()
    xc = x.clone().requires_grad_()
    model(xe).backward(g)
    compiled(xc).backward(g)
    torch.testing.assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-5)
    eager_params = dict(model.named_parameters())
    for name, p in compiled_model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, eager_params[name].grad, atol=1e-5, rtol=1e-5, msg=name)
    values_grads = [n for n, _ in compiled_model.named_parameters() if n.endswith("values")]
    assert len(values_grads) == 3

    # a second call (new input, same shapes) hits the compiled graph and still matches
    x2 = torch.randn(12, 16)
    torch.testing.assert_close(compiled(x2), model(x2), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
