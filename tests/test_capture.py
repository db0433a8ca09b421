"""Capture of a layer's input and output gradient for RigL's growth scores."""

import copy

import torch
from torch import nn

import sparsekernels as sk
from sparsekernels.methods import MaskedDenseRigL, RigL


def test_capture_concatenates_micro_batches_and_frees():
    layer = sk.SparseLinear(6, 4, sparsity=0.5, dtype=torch.float64)
    layer.capture_next(True)
    xs = [torch.randn(3, 6, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)]
    for x in xs:
        layer(x).pow(2).sum().backward()
    x_cap, dy_cap = layer.captured()
    assert x_cap.shape == (13, 6) and dy_cap.shape == (13, 4)
    w = layer.to_dense().weight.detach()
    expected_grad = sum((2 * (x @ w.t() + layer.bias.detach())).reshape(-1, 4).t() @ x.reshape(-1, 6) for x in xs)
    torch.testing.assert_close(dy_cap.t() @ x_cap, expected_grad)
    layer.capture_next(False)
    assert layer.captured() is None


def test_capture_sees_hooks_on_the_output_and_works_under_compile():
    """The captured dy is the gradient that reaches the weights: after a caller's hook on
    the layer output (here doubling it), and the layer's own output's gradient when the
    model runs under torch.compile (where the product's backward node is the compiled
    graph's, with several outputs)."""
    torch.manual_seed(0)
    model = nn.Sequential(sk.SparseLinear(8, 6, sparsity=0.5, dtype=torch.float64), nn.Tanh(),
                          sk.SparseLinear(6, 5, sparsity=0.5, dtype=torch.float64))
    x = torch.randn(7, 8, dtype=torch.float64)

    def run(m):
        for layer in (model[0], model[2]):
            layer.capture_next(True)
        y = m(x)
        y.register_hook(lambda g: 2 * g)
        y.square().sum().backward()
        out = [layer.captured() for layer in (model[0], model[2])]
        for layer in (model[0], model[2]):
            layer.capture_next(False)
        return out

    eager = run(model)
    y = model(x).detach()
    torch.testing.assert_close(eager[1][1], 2 * (2 * y))  # the hook's doubling is in
    compiled = run(torch.compile(model, backend="aot_eager"))
    for (xe, dye), (xc, dyc) in zip(eager, compiled):
        torch.testing.assert_close(xc, xe)
        torch.testing.assert_close(dyc, dye)


def test_no_capture_without_grad_or_when_off():
    layer = sk.SparseLinear(6, 4, sparsity=0.5)
    layer(torch.randn(2, 6)).sum().backward()
    assert layer.captured() is None
    layer.capture_next(True)
    with torch.no_grad():
        layer(torch.randn(2, 6))
    assert layer.captured() is None


def test_rigl_with_gradient_accumulation_matches_masked_dense():
    torch.manual_seed(3)
    dense = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3)).double()
    sparse = copy.deepcopy(dense)
    opt_s = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    rigl = RigL(sparse, opt_s, sparsity=0.7, update_interval=3, total_steps=40)
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9)
    ref = MaskedDenseRigL(dense, opt_d, rigl.masks(), update_interval=3, t_end=rigl.t_end)
    g = torch.Generator().manual_seed(0)
    changed = False
    first = {n: m.clone() for n, m in rigl.masks().items()}
    for _ in range(12):
        micro = [(torch.randn(5, 12, generator=g, dtype=torch.float64),
                  torch.randn(5, 3, generator=g, dtype=torch.float64)) for _ in range(3)]
        for model, opt in ((sparse, opt_s), (dense, opt_d)):
            opt.zero_grad()
            for x, y in micro:  # three micro-batches, one optimizer step
                nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        for name, mask in rigl.masks().items():
            assert torch.equal(mask, ref.masks[name])
            changed |= not torch.equal(mask, first[name])
    assert changed
    assert len(rigl.history) == 4
