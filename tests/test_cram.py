"""CrAM / CrAM+: one step against an independent computation (global top-k and 2:4
compressors, BatchNorm statistics from the clean pass), the seeded draw of the targets,
exact resume, argument checks, one-shot pruning to real sparse layers, and the acceptance
runs on digits (MLP and CNN with BatchNorm)."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekernels import SparseConv2d, SparseLinear
from sparsekernels.bench.ensembles import batches, digits, digits_cnn, digits_mlp, probabilities, train
from sparsekernels.formats import kept_count
from sparsekernels.methods import CrAM, one_shot_prune, recalibrate_batchnorm
from sparsekernels.methods.cram import global_keep
from sparsekernels.nn import Sparse24Linear

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_thread")]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3)).double()


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def _reference_step(model, x, y, target, rho, lr, plus):
    """θ - lr [g0 + g1] (or lr g1), g1 at C(θ + ρ g0), computed from scratch; BN statistics
    from the clean pass alone."""
    params = list(model.parameters())
    g0 = torch.autograd.grad(F.cross_entropy(model(x), y), params)  # clean pass: BN stats move here
    stats = {k: v.clone() for k, v in model[1].named_buffers()}
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in zip(probe.parameters(), g0):
            p.add_(rho * g)
        weights = [probe[0].weight, probe[3].weight]
        if target == "2:4":
            for w in weights:
                groups = w.abs().reshape(w.shape[0], -1, 4)
                top2 = groups.argsort(dim=-1, descending=True)[..., :2]
                w.mul_(torch.zeros_like(groups).scatter_(-1, top2, 1.0).reshape(w.shape))
        else:
            flat = torch.cat([w.reshape(-1) for w in weights])
            k = round((1 - target) * flat.numel())
            cut = flat.abs().sort(descending=True).values[k - 1]
            for w in weights:
                w.mul_(w.abs() >= cut)
    g1 = torch.autograd.grad(F.cross_entropy(probe(x), y), list(probe.parameters()))
    with torch.no_grad():
        for p, a, b in zip(params, g0, g1):
            p.sub_(lr * (a + b if plus else b))
    return stats


@pytest.mark.parametrize("target", [0.7, "2:4"])
@pytest.mark.parametrize("plus", [True, False])
def test_step_matches_independent_computation(target, plus):
    model, ref = _model(), _model()
    cram = CrAM(model.parameters(), model, sparsities=(target,), rho=0.3, plus=plus, lr=0.1)
    x, y = _batch()
    cram.step(_closure(model, cram, x, y))
    stats = _reference_step(ref, x, y, target, rho=0.3, lr=0.1, plus=plus)
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert set(stats) == {"running_mean", "running_var", "num_batches_tracked"}
    for key, value in stats.items():
        assert torch.equal(getattr(model[1], key), value), key
    assert cram.last_target == target and cram.steps == 1


def test_targets_drawn_from_seeded_generator_and_resume_is_exact():
    data = [_batch(s) for s in range(10)]
    kw = dict(sparsities=(0.5, 0.9, "2:4"), rho=0.1, seed=3)
    model = _model()
    cram = CrAM(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, **kw)
    drawn = []
    for x, y in data[:4]:
        cram.step(_closure(model, cram, x, y))
        drawn.append(cram.last_target)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": cram.state_dict()}, buf)
    for x, y in data[4:]:
        cram.step(_closure(model, cram, x, y))
        drawn.append(cram.last_target)
    g = torch.Generator().manual_seed(3)
    assert drawn == [kw["sparsities"][int(torch.randint(3, (1,), generator=g))] for _ in range(10)]
    assert len(set(drawn)) > 1
    model2 = _model(seed=9)
    cram2 = CrAM(torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9), model2, **kw)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2.load_state_dict(saved["model"])
    cram2.load_state_dict(saved["opt"])
    assert cram2.param_groups is cram2.base_optimizer.param_groups and cram2.steps == 4
    drawn2 = []
    for x, y in data[4:]:
        cram2.step(_closure(model2, cram2, x, y))
        drawn2.append(cram2.last_target)
    assert drawn2 == drawn[4:]
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n


def test_lr_scheduler_and_zero_grad_act_on_the_base_optimizer():
    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    cram = CrAM(base, model)
    scheduler = torch.optim.lr_scheduler.StepLR(cram, step_size=1, gamma=0.5)
    x, y = _batch()
    cram.step(_closure(model, cram, x, y))
    scheduler.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    cram.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("make, err, text", [
    (lambda m: CrAM(m.parameters(), m, rho=-0.1), ValueError, "rho"),
    (lambda m: CrAM(m.parameters(), m, sparsities=()), ValueError, "at least one"),
    (lambda m: CrAM(m.parameters(), m, sparsities=(0.5, 1.0)), ValueError, "sparsities"),
    (lambda m: CrAM(m.parameters(), m, sparsities=("1:4",)), ValueError, "sparsities"),
    (lambda m: CrAM(torch.optim.SGD(_model().parameters(), lr=0.1), m), ValueError, "does not hold"),
    (lambda m: CrAM(torch.optim.SGD(m[0].parameters(), lr=0.1), m), ValueError, r"\['3'"),
    (lambda m: CrAM(m.parameters(), m, plus=1), TypeError, "plus"),
    (lambda m: CrAM(m.parameters(), "model"), TypeError, "model"),
    (lambda m: CrAM(m.parameters(), m).step(), ValueError, "closure"),
    (lambda m: CrAM(m.parameters(), m).load_state_dict({}), ValueError, "cram"),
    (lambda m: one_shot_prune(m, 1.0), ValueError, "sparsities"),
])
def test_bad_input(make, err, text):
    with pytest.raises(err, match=text):
        make(_model())


def test_global_keep_exact_count_and_ties_to_earlier_positions():
    mags = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0])
    assert global_keep(mags, 3).tolist() == [False, True, True, False, True]
    assert global_keep(mags, 0).sum() == 0 and global_keep(mags, 5).all()
    x = torch.rand(1000)
    assert torch.equal(global_keep(x, 137), x >= x.sort(descending=True).values[136])


def test_one_shot_prune_global_magnitude_to_real_sparse_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 36, 8), nn.ReLU(),
                          nn.Linear(8, 4))
    weights = [model[0].weight, model[2].weight, model[4].weight]
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights])
    k = kept_count(flat.numel(), 0.9)
    cut = flat.sort(descending=True).values[k - 1]
    pruned = one_shot_prune(model, 0.9, inplace=False)
    assert isinstance(pruned[0], SparseConv2d) and isinstance(pruned[2], SparseLinear)
    assert sum(pruned[i].nnz for i in (0, 2, 4)) == k
    for i, w in zip((0, 2, 4), weights):
        dense = pruned[i].dense_weight() if i == 0 else pruned[i].csr().to_dense()
        assert torch.equal(dense != 0, w.detach().abs() >= cut)
    x = torch.randn(2, 1, 6, 6)
    assert isinstance(model[0], nn.Conv2d)  # inplace=False left the dense model alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p24 = one_shot_prune(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), "2:4")
    assert isinstance(p24[0], Sparse24Linear) and isinstance(p24[2], Sparse24Linear)
    assert pruned(x).shape == (2, 4)


# --------------------------------------------------------------------------- acceptance (digits)
def _accuracy(model, x, y):
    return float((probabilities(model, x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_cram_one_shot_pruned_beats_sgd(kind):
    xtr, ytr, xte, yte = digits(0, cnn=kind == "cnn")
    calibration = [x for x, _ in batches(xtr, ytr, 64, 1, seed=2)]
    results = {}
    for name in ("sgd", "cram"):
        torch.manual_seed(0)
        model = digits_cnn(8) if kind == "cnn" else digits_mlp(128)
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        opt = CrAM(base, model, sparsities=(0.8, 0.9, "2:4"), rho=0.1) if name == "cram" else base
        train(model, opt, batches(xtr, ytr, 64, 15, seed=1), closure_step=name == "cram")
        out = {"dense": _accuracy(model, xte, yte)}
        for target in (0.9, "2:4"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # 2:4 leaves the convolutions dense, and says so
                pruned = one_shot_prune(model, target, inplace=False)
            recalibrate_batchnorm(pruned, calibration)  # no fine-tuning: statistics only
            out[target] = _accuracy(pruned, xte, yte)
        results[name] = out
    cram, sgd = results["cram"], results["sgd"]
    for target in (0.9, "2:4"):
        assert cram[target] >= sgd[target] + 0.10 or cram[target] >= cram["dense"] - 0.02, (target, results)
