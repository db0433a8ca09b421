"""Supermasks (Zhou et al. 2019): a ticket's mask on the initial weights as real sparse
layers, the learned supermask (straight-through gradient written out here, final mask by
score against a numpy reference, frozen weights, the sparse network it returns), and the
digits acceptance: at least 80% test accuracy from a random init whose weights never train."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekernels import SparseConv2d, SparseLinear
from sparsekernels.formats import kept_count
from sparsekernels.methods import LearnedSupermask, LotteryTicket, mask_initial_weights

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("pinned_backend")]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5)).double()


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 5)).double()


# --------------------------------------------------------------------------- mask on the initial weights
@pytest.mark.parametrize("already_sparse", [False, True])
def test_mask_on_initial_weights_is_a_sparse_model_of_theta0(already_sparse):
    model = _mlp()
    init = copy.deepcopy(model)
    lt = LotteryTicket(model, lambda p: torch.optim.Adam(p, lr=0.05), prune_fraction=0.5, rounds=2,
                       criterion="large_final_same_sign")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 12, generator=g, dtype=torch.float64), torch.randint(0, 5, (16,), generator=g)
    for rnd in lt.rounds():
        for _ in range(5):
            rnd.optimizer.zero_grad()
            F.cross_entropy(rnd.model(x), y).backward()
            rnd.optimizer.step()
    masks = lt.masks()
    # A copy taken after the driver made the layers sparse (density 1) works as well.
    source = init if not already_sparse else copy.deepcopy(LotteryTicket(_mlp(), torch.optim.Adam, rounds=1).model)
    ticket = mask_initial_weights(source, masks)
    assert source is not ticket and not any(isinstance(m, SparseLinear) and m.sparsity > 0 for m in source.modules())
    h = x
    for name in ("0", "2"):
        layer = ticket.get_submodule(name)
        assert type(layer) is SparseLinear and layer.nnz == int(masks[name].sum())
        w0, b0 = init.get_submodule(name).weight.detach(), init.get_submodule(name).bias.detach()
        assert torch.equal(layer.values.detach(), w0[masks[name]])
        h = F.linear(h, w0 * masks[name], b0)  # the masked-dense forward of theta_0
        h = torch.relu(h) if name == "0" else h
    torch.testing.assert_close(ticket(x), h, rtol=1e-12, atol=1e-12)


def test_mask_on_initial_weights_conv():
    init = _cnn()
    g = torch.Generator().manual_seed(2)
    masks = {n: torch.rand(m.weight.shape, generator=g) > 0.6 for n, m in init.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))}
    ticket = mask_initial_weights(init, masks)
    assert type(ticket.get_submodule("2")) is SparseConv2d
    dense = copy.deepcopy(init)
    with torch.no_grad():
        for n, m in masks.items():
            dense.get_submodule(n).weight.mul_(m)
    x = torch.randn(3, 3, 5, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ticket(x), dense(x), rtol=1e-10, atol=1e-12)


def test_mask_on_initial_weights_bad_input():
    init = _mlp()
    with pytest.raises(ValueError, match="'9'"):
        mask_initial_weights(init, {"9": torch.ones(5, 32, dtype=torch.bool)})
    with pytest.raises(TypeError, match="bool"):
        mask_initial_weights(init, {"0": torch.ones(32, 12)})
    with pytest.raises(ValueError, match="shape"):
        mask_initial_weights(init, {"0": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="ReLU"):
        mask_initial_weights(init, {"1": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="masks"):
        mask_initial_weights(init, {})


# --------------------------------------------------------------------------- learned supermask
def test_straight_through_gradient_reaches_the_scores():
    """d loss / d s = (d loss / d W_eff) * W * sigmoid'(s), with the mask sampled from the
    seeded generator (the estimator passes the gradient through the Bernoulli sample)."""
    model = _mlp()
    w = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    b = [model[0].bias.detach().clone(), model[2].bias.detach().clone()]
    sm = LearnedSupermask(model, sparsity=0.3, seed=5)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in sm.layers.values():
            layer.scores.copy_(torch.randn(layer.scores.shape, generator=g, dtype=torch.float64))
    x, y = torch.randn(8, 12, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g)
    model.train()
    F.cross_entropy(model(x), y).backward()

    scores = [sm.layers["0"].scores.detach(), sm.layers["2"].scores.detach()]
    sampler = torch.Generator().manual_seed(5)
    masks = [torch.bernoulli(torch.sigmoid(s), generator=sampler) for s in scores]  # forward order
    w_eff = [(wi * mi).requires_grad_() for wi, mi in zip(w, masks)]
    out = F.linear(torch.relu(F.linear(x, w_eff[0], b[0])), w_eff[1], b[1])
    F.cross_entropy(out, y).backward()
    for name, s, wi, we in zip(("0", "2"), scores, w, w_eff):
        want = we.grad * wi * torch.sigmoid(s) * (1 - torch.sigmoid(s))
        torch.testing.assert_close(sm.layers[name].scores.grad, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, None])
def test_final_mask_by_score(sparsity):
    model = _mlp()
    sm = LearnedSupermask(model, sparsity=sparsity)
    g = torch.Generator().manual_seed(4)
    layer = sm.layers["0"]
    with torch.no_grad():
        # Integers: many ties, which go to the lower flat index.
        layer.scores.copy_(torch.randint(-4, 5, layer.scores.shape, generator=g).double())
    got = sm.masks()["0"]
    flat = layer.scores.detach().reshape(-1).numpy()
    if sparsity is None:
        want = flat > 0
    else:
        order = np.argsort(-flat, kind="stable")
        want = np.zeros(flat.size, dtype=bool)
        want[order[:kept_count(flat.size, sparsity)]] = True
    assert np.array_equal(got.reshape(-1).numpy(), want)


def test_only_scores_train_and_the_result_is_sparse():
    model = _cnn()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    sm = LearnedSupermask(model, sparsity=0.5, seed=1)
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.endswith("scores"))
    opt = torch.optim.Adam(sm.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,), generator=g)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for name, layer in sm.layers.items():
        assert torch.equal(layer.layer.weight, frozen[f"{name}.weight"])
        assert torch.equal(layer.layer.bias, frozen[f"{name}.bias"])
    model.eval()
    sparse = sm.sparse_model()
    assert [type(sparse.get_submodule(n)) for n in ("0", "2", "4")] == [SparseConv2d, SparseConv2d, SparseLinear]
    assert sum(p.numel() for n, p in sparse.named_parameters() if "scores" in n) == 0
    for name, mask in sm.masks().items():
        layer = sparse.get_submodule(name)
        assert torch.equal(layer.mask(), mask) and layer.nnz == int(mask.sum())
        assert torch.equal(layer.values.detach(), frozen[f"{name}.weight"][mask])
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs,err,match", [
    ({"sparsity": 1.0}, ValueError, "sparsity"),
    ({"sparsity": "0.5"}, TypeError, "sparsity"),
    ({"score_init": float("inf")}, ValueError, "score_init"),
    ({"seed": 1.5}, ValueError, "seed"),
])
def test_learned_supermask_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        LearnedSupermask(_mlp(), **kwargs)


def test_learned_supermask_needs_a_layer():
    with pytest.raises(ValueError, match="no dense"):
        LearnedSupermask(nn.Sequential(nn.ReLU()))


def test_learned_supermask_on_random_init_digits():
    """MLP 64-512-512-10 at its random init, weights frozen: only the scores train (Adam,
    lr 0.2, 6 epochs); the mask keeps weights whose sigmoid(score) > 1/2 (the density is
    learned, as in the paper). The returned network of sparse layers reaches >= 80%."""
    pytest.importorskip("sklearn")
    from sparsekernels.bench.lottery_curve import accuracy, digits, mlp, train

    data = digits(0)
    model = mlp([64, 512, 512, 10], 0)
    sm = LearnedSupermask(model, sparsity=None, seed=0)
    opt = torch.optim.Adam(sm.parameters(), lr=0.2)
    for epoch in range(6):
        model.train()
        train(model, opt, data, epochs=1, seed=epoch)
    model.eval()
    sparse = sm.sparse_model()
    assert all(type(sparse.get_submodule(n)) is SparseLinear for n in ("0", "2", "4"))
    acc = accuracy(sparse, data)
    assert acc >= 80.0, f"supermask accuracy {acc:.1f}%"
    assert accuracy(model, data) == acc  # the search's own evaluation mask is the same network
    density = sum(int(m.sum()) for m in sm.masks().values()) / sum(m.numel() for m in sm.masks().values())
    assert 0.2 < density < 0.8
