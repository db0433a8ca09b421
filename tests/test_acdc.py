"""AC/DC (Peste et al., NeurIPS 2021) on the real sparse layers: schedule, mask decisions
against an independent masked-dense implementation, bit-identical resume, the dense half
of the pair, accuracy on digits, bad input; and the dense fast path of density-1 layers."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import sparsekernels as sk
from sparsekernels.methods import ACDC, get_method
from sparsekernels.methods._phases import grow_full
from sparsekernels.methods.acdc import acdc_schedule
from sparsekernels.topology import grow_to_dense

from digits_task import accuracy, batch_order, cnn, digits, mlp, run_steps


# --------------------------------------------------------------------------- the masked-dense reference
class MaskedDenseACDC:
    """AC/DC written from the paper on dense layers: weight x 0/1 mask, dense gradients
    zeroed outside the mask before the step, at a C start a stable sort of |w| keeps the
    top k (over all layers, or per layer), the pruned weights and their optimizer state
    set to zero; at a D start every mask is all ones."""

    def __init__(self, model, optimizer, changes, sparsity, distribution):
        self.model, self.optimizer = model, optimizer
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        self.masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in self.layers.items()}
        self.changes, self.sparsity, self.distribution = dict(changes), sparsity, distribution
        self.step, self.sparse, self.recorded = 0, False, []
        optimizer.register_step_pre_hook(self._before)
        optimizer.register_step_post_hook(self._after)

    def _before(self, *args):
        if self.sparse:
            for n, m in self.layers.items():
                m.weight.grad.mul_(self.masks[n])

    @staticmethod
    def _top(values, k):
        mask = torch.zeros(values.numel(), dtype=torch.bool)
        mask[torch.sort(values.abs(), descending=True, stable=True).indices[:k]] = True
        return mask

    @torch.no_grad()
    def _after(self, *args):
        self.step += 1
        phase = self.changes.get(self.step)
        if phase is None:
            return
        self.sparse = phase == "sparse"
        if self.sparse:
            weights = [m.weight.reshape(-1) for m in self.layers.values()]
            if self.distribution == "global":
                total = sum(w.numel() for w in weights)
                flat = self._top(torch.cat(weights), max(1, round((1 - self.sparsity) * total)))
                parts = flat.split([w.numel() for w in weights])
            else:
                parts = [self._top(w, max(1, round((1 - self.sparsity) * w.numel()))) for w in weights]
            for (n, m), keep in zip(self.layers.items(), parts):
                self.masks[n] = keep.view_as(m.weight)
                m.weight.mul_(self.masks[n])
                for v in self.optimizer.state.get(m.weight, {}).values():
                    if torch.is_tensor(v) and v.shape == m.weight.shape:
                        v.mul_(self.masks[n])
        else:
            self.masks = {n: torch.ones_like(m, dtype=torch.bool) for n, m in self.masks.items()}
        self.recorded.append((self.step, {n: m.clone() for n, m in self.masks.items()}))


def record_masks(method):
    """Masks of ``method`` after every phase change (a post-hook registered after the method's)."""
    recorded = []

    def hook(*args):
        if method.history and method.history[-1]["step"] == method.step:
            recorded.append((method.step, method.masks()))

    method.optimizer.register_step_post_hook(hook)
    return recorded


# --------------------------------------------------------------------------- schedule
def test_schedule_paper_defaults():
    changes = acdc_schedule(100, 10, 5, 85)
    # 7 C/D pairs end exactly where the last D ends (85%); 10%..85% is 7.5 pairs, so the
    # warm-up runs to 15%; the final C runs from 85% to the end.
    assert changes[0] == (15, "sparse") and changes[-2:] == [(80, "dense"), (85, "sparse")]
    assert [p for _, p in changes] == ["sparse", "dense"] * 7 + ["sparse"]
    assert all(b - a == 5 for (a, _), (b, _) in zip(changes, changes[1:]))
    model = mlp(0, hidden=16)
    method = ACDC(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.9, total_steps=1000)
    assert method.changes == acdc_schedule(1000, 100, 50, 850) and method.phase == "dense"
    assert get_method("acdc") is ACDC


# --------------------------------------------------------------------------- real layers in both phases
def test_phases_use_sparse_layers_and_keep_state(seed):
    data = digits()
    model = mlp(seed, hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    method = ACDC(model, opt, sparsity=0.8, total_steps=40, warmup=4, phase_length=4, dense_end=36)
    layers = list(method.layers.values())
    assert all(isinstance(m, sk.SparseLinear) and m.nnz == m.in_features * m.out_features for m in layers)
    assert all(m._full_row_major() for m in layers)  # the dense phase runs the dense matmul
    order = batch_order(data[0].shape[0], 32, 1)
    total = sum(m.nnz for m in layers)
    run_steps(model, opt, data, order[:4])  # the warm-up ends: first compressed phase
    assert method.phase == "sparse" and sum(m.nnz for m in layers) == round(0.2 * total)
    for m in layers:
        assert not m._full_row_major()
        assert opt.state[m.values]["exp_avg"].shape == m.values.shape  # O(nnz) optimizer state
    before = {n: (m.mask().clone(), m.values.detach().clone(), opt.state[m.values]["exp_avg"].clone())
              for n, m in method.layers.items()}
    run_steps(model, opt, data, order[4:8])
    assert method.phase == "dense" and method.history[-1]["phase"] == "dense"
    # Just grown: pruned positions restart at 0 with zero state; the kept ones keep their state.
    for n, m in method.layers.items():
        mask, _, _ = before[n]
        assert m.nnz == mask.numel()
        state = opt.state[m.values]["exp_avg"].view(mask.shape)
        assert torch.count_nonzero(state[~mask]) == 0 and torch.count_nonzero(state[mask]) > 0
    assert [r["phase"] for r in method.history] == ["sparse", "dense"]
    method.remove()
    run_steps(model, opt, data, order[8:20])
    assert len(method.history) == 2  # detached: no more phase changes


@pytest.mark.parametrize("arch, distribution", [("mlp", "global"), ("mlp", "uniform"), ("cnn", "global")])
def test_masks_match_masked_dense_reference(arch, distribution):
    data = digits(torch.float64)
    build = (lambda: mlp(3, hidden=48, dtype=torch.float64)) if arch == "mlp" else \
        (lambda: cnn(3, torch.float64, channels=(8, 16)))
    order = batch_order(data[0].shape[0], 32, 1)[:40]
    # total 40, warm-up 5, phases 4, last D ends at 33: 3 pairs from 9 (written out here,
    # independently of acdc_schedule).
    changes = [(9, "sparse"), (13, "dense"), (17, "sparse"), (21, "dense"), (25, "sparse"), (29, "dense"),
               (33, "sparse")]
    ref_model = build()
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=3e-3)
    ref = MaskedDenseACDC(ref_model, ref_opt, changes, 0.9, distribution)
    run_steps(ref_model, ref_opt, data, order)

    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    method = ACDC(model, opt, sparsity=0.9, total_steps=40, warmup=5, phase_length=4, dense_end=33,
                  distribution=distribution)
    assert method.changes == changes
    got = record_masks(method)
    run_steps(model, opt, data, order)

    assert [s for s, _ in got] == [s for s, _ in ref.recorded] == [s for s, _ in changes]
    for (step, masks), (_, want) in zip(got, ref.recorded):
        for name, mask in masks.items():
            assert torch.equal(mask, want[name]), f"mask of {name} differs after step {step}"
    dense = sk.densify(copy.deepcopy(model))
    for (name, m), (_, r) in zip(dense.named_modules(), ref_model.named_modules()):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            torch.testing.assert_close(m.weight, r.weight, rtol=1e-9, atol=1e-12)


def test_erk_and_uniform_counts():
    model = mlp(0, hidden=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = ACDC(model, opt, sparsity=0.9, total_steps=20, warmup=2, phase_length=2, dense_end=18,
                  distribution="erk")
    data = digits()
    run_steps(model, opt, data, batch_order(data[0].shape[0], 32, 1)[:2])
    targets = method.layer_targets()
    for name, layer in method.layers.items():
        assert layer.nnz == max(1, round((1 - targets[name]) * layer.in_features * layer.out_features))
    assert targets["4"] < targets["2"]  # ERK: the small output layer keeps more


# --------------------------------------------------------------------------- resume
def _fresh(seed):
    model = mlp(seed, hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    method = ACDC(model, opt, sparsity=0.85, total_steps=60, warmup=8, phase_length=5, dense_end=50)
    return model, opt, method


@pytest.mark.parametrize("stop", [17, 23])  # mid decompressed, mid compressed
def test_resume_mid_phase_is_bit_identical(stop):
    data = digits()
    order = batch_order(data[0].shape[0], 32, 2)[:60]
    model, opt, method = _fresh(0)
    run_steps(model, opt, data, order)

    model2, opt2, method2 = _fresh(0)
    run_steps(model2, opt2, data, order[:stop])
    assert method2.phase == ("dense" if stop == 17 else "sparse")
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "method": method2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model3, opt3, method3 = _fresh(1)  # other initial weights: the checkpoint must replace all
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    method3.load_state_dict(saved["method"])
    assert method3.step == stop and method3.phase == method2.phase
    run_steps(model3, opt3, data, order[stop:])

    sd, sd3 = model.state_dict(), model3.state_dict()
    assert sd.keys() == sd3.keys() and all(torch.equal(sd[k], sd3[k]) for k in sd)
    for p, p3 in zip(opt.param_groups[0]["params"], opt3.param_groups[0]["params"]):
        for k, v in opt.state[p].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt3.state[p3][k])), k
    assert method3.history == method.history and method3.step == method.step == 60
    d, d3 = method.dense_model().state_dict(), method3.dense_model().state_dict()
    assert all(torch.equal(d[k], d3[k]) for k in d)


# --------------------------------------------------------------------------- the dense half of the pair
def test_dense_model_is_the_model_at_the_end_of_the_last_decompressed_phase():
    data = digits()
    model = mlp(0, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method = ACDC(model, opt, sparsity=0.9, total_steps=30, warmup=4, phase_length=4, dense_end=20)
    order = batch_order(data[0].shape[0], 32, 1)[:30]
    with pytest.raises(RuntimeError, match="no decompressed phase"):
        method.dense_model()
    seen = {}
    update = method.update

    def spy(step):  # the model as the optimizer step left it, before the switch
        seen[step] = sk.densify(copy.deepcopy(model))
        return update(step)

    method.update = spy
    run_steps(model, opt, data, order[:20])
    expected = seen[20]  # the last D phase ended with step 20
    assert method.phase == "sparse" and method.history[-1]["step"] == 20
    run_steps(model, opt, data, order[20:])
    got = method.dense_model()
    assert all(isinstance(m, nn.Linear) for m in got if not isinstance(m, nn.ReLU))
    e, g = expected.state_dict(), got.state_dict()
    assert e.keys() == g.keys() and all(torch.equal(e[k], g[k]) for k in e)
    assert method.layers["0"].nnz < 64 * 32  # the training model stays compressed
    model2 = mlp(0, hidden=8)
    m2 = ACDC(model2, torch.optim.SGD(model2.parameters(), lr=0.1), sparsity=0.5, total_steps=30,
              keep_dense_model=False)
    with pytest.raises(RuntimeError, match="keep_dense_model"):
        m2.dense_model()


# --------------------------------------------------------------------------- accuracy (acceptance)
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_acdc_digits_accuracy(arch):
    """At 90%: the final sparse model within 1 point of dense, its dense model within 0.5."""
    torch.manual_seed(0)
    data = digits()
    build = mlp if arch == "mlp" else cnn
    order = batch_order(data[0].shape[0], 32 if arch == "mlp" else 64, 20)
    total = len(order)
    acc = {}
    for kind in ("dense", "acdc"):
        model = build(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
        method = ACDC(model, opt, sparsity=0.9, total_steps=total) if kind == "acdc" else None
        run_steps(model, opt, data, order, sched)
        acc[kind] = accuracy(model, data)
        if method is not None:
            assert method.phase == "sparse"
            nnz = sum(m.nnz for m in method.layers.values())
            assert nnz == round(0.1 * sum(m.weight.numel() for m in build(0).modules()
                                          if isinstance(m, (nn.Linear, nn.Conv2d))))
            acc["acdc_dense"] = accuracy(method.dense_model(), data)
    assert acc["acdc"] >= acc["dense"] - 1.0, acc
    assert acc["acdc_dense"] >= acc["dense"] - 0.5, acc


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, exc, match", [
    ({"sparsity": 1.0}, ValueError, "sparsity"),
    ({"sparsity": -0.1}, ValueError, "sparsity"),
    ({"sparsity": "0.9"}, TypeError, "sparsity"),
    ({"total_steps": 0}, ValueError, "total_steps"),
    ({"total_steps": None}, ValueError, "total_steps"),
    ({"phase_length": 0.5}, ValueError, "phase_length"),
    ({"phase_length": 0}, ValueError, "phase_length"),
    ({"dense_end": 100}, ValueError, "dense_end"),
    ({"dense_end": 1.5}, ValueError, "dense_end"),
    ({"warmup": 0.9}, ValueError, "phase_length"),
    ({"warmup": "10"}, ValueError, "warmup"),
    ({"distribution": "random"}, ValueError, "distribution"),
    ({"keep_dense_model": 1}, TypeError, "keep_dense_model"),
])
def test_bad_input(kwargs, exc, match):
    model = mlp(0, hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = {"sparsity": 0.9, "total_steps": 100, **kwargs}
    with pytest.raises(exc, match=match):
        ACDC(model, opt, **args)
    assert isinstance(model[0], nn.Linear) and opt.param_groups[0]["params"][0] is model[0].weight  # untouched


def test_load_state_dict_rejects_a_bad_schedule():
    model = mlp(0, hidden=8)
    method = ACDC(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.9, total_steps=100)
    state = method.state_dict()
    with pytest.raises(ValueError, match="phase_length"):
        method.load_state_dict({**state, "phase_steps": 60})
    with pytest.raises(ValueError, match="dense_snapshot"):
        method.load_state_dict({**state, "dense_snapshot": {"layers": {"nope": torch.zeros(1)}, "other": {}}})


# --------------------------------------------------------------------------- growth to density 1
@pytest.mark.parametrize("make", [lambda: sk.SparseLinear(30, 20, sparsity=0.8, dtype=torch.float64),
                                  lambda: sk.SparseConv2d(4, 6, 3, groups=2, sparsity=0.7, dtype=torch.float64)])
def test_grow_full_equals_grow_to_dense(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(3, 30, dtype=torch.float64) if isinstance(layer, sk.SparseLinear) else \
        torch.randn(2, 4, 5, 5, dtype=torch.float64)
    opt = torch.optim.Adam(layer.parameters())
    layer(x).square().sum().backward()
    opt.step()
    twin = copy.deepcopy(layer)
    opt2 = torch.optim.Adam(twin.parameters())
    opt2.load_state_dict(opt.state_dict())
    grow_to_dense(layer, [opt])
    stats = grow_full(twin, [opt2])
    for name in ("values", "row_ptr", "col_idx", "t_row_ptr", "t_col_idx", "t_perm"):
        a, b = getattr(layer, name), getattr(twin, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt.state[layer.values][key], opt2.state[twin.values][key])
    assert stats["nnz"] == layer.nnz
    torch.testing.assert_close(twin(x), layer.to_dense()(x))


def test_density_one_layer_runs_a_dense_matmul(monkeypatch):
    """A full layer bypasses the CSR op (values viewed as the dense weight), same numbers."""
    torch.manual_seed(0)
    dense = nn.Linear(24, 16, dtype=torch.float64)
    full = sk.SparseLinear.from_dense(dense, mask=torch.ones(16, 24, dtype=torch.bool))
    partial = sk.SparseLinear.from_dense(dense, sparsity=0.5)
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    y = full(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, dense(x))
    w_grad = torch.autograd.grad(dense(x).square().sum(), dense.weight)[0]
    torch.testing.assert_close(full.values.grad.view(16, 24), w_grad)

    import sparsekernels.nn._sparse_weight as sw

    def no_spmm(*args):
        raise AssertionError("the CSR op ran")

    monkeypatch.setattr(sw, "spmm", no_spmm)
    full(x)  # does not reach the op
    with pytest.raises(AssertionError, match="CSR op"):
        partial(x)
