"""GaP (Ma et al., ICLR 2022), cyclic schedule, on the real sparse layers: schedule, mask
decisions against an independent masked-dense implementation, bit-identical resume,
accuracy against Static on digits, bad input."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import sparsekernels as sk
from sparsekernels.formats import random_mask
from sparsekernels.methods import GaP, Static, get_method
from sparsekernels.methods._phases import in_block_numel
from sparsekernels.methods.gap import gap_schedule, split_contiguous

from digits_task import accuracy, batch_order, cnn, digits, mlp, run_steps


class MaskedDenseGaP:
    """Cyclic GaP written from the paper on dense layers with 0/1 masks: random initial
    masks at the target (same seed), group 0 grown at once (new weights 0); every
    ``phase`` steps the dense group keeps its top-k |w| per layer (stable sort), pruned
    weights and optimizer state zeroed, and the next group is grown; after
    ``cycles * partitions`` phases nothing is grown. Gradients outside the masks are
    zeroed before every step."""

    def __init__(self, model, optimizer, groups, sparsity, phase, n_phases, seed):
        self.model, self.optimizer = model, optimizer
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        g = torch.Generator().manual_seed(seed)
        self.masks = {n: random_mask(tuple(m.weight.shape), sparsity, generator=g) for n, m in self.layers.items()}
        self.groups, self.sparsity, self.phase, self.n_phases = groups, sparsity, phase, n_phases
        self.step, self.recorded = 0, []
        with torch.no_grad():
            for n, m in self.layers.items():
                m.weight.mul_(self.masks[n])
        self._grow(0)
        optimizer.register_step_pre_hook(self._before)
        optimizer.register_step_post_hook(self._after)

    def _grow(self, group):
        for n in self.groups[group]:
            self.masks[n] = torch.ones_like(self.masks[n])
        self.recorded.append((self.step, {n: m.clone() for n, m in self.masks.items()}))

    def _before(self, *args):
        for n, m in self.layers.items():
            m.weight.grad.mul_(self.masks[n])

    @torch.no_grad()
    def _after(self, *args):
        self.step += 1
        if self.step % self.phase or self.step > self.phase * self.n_phases:
            return
        j = self.step // self.phase
        for n in self.groups[(j - 1) % len(self.groups)]:
            w = self.layers[n].weight
            k = max(1, round((1 - self.sparsity) * w.numel()))
            keep = torch.zeros(w.numel(), dtype=torch.bool)
            keep[torch.sort(w.abs().reshape(-1), descending=True, stable=True).indices[:k]] = True
            self.masks[n] = keep.view_as(w)
            w.mul_(self.masks[n])
            for v in self.optimizer.state.get(w, {}).values():
                if torch.is_tensor(v) and v.shape == w.shape:
                    v.mul_(self.masks[n])
        if j < self.n_phases:
            self._grow(j % len(self.groups))
        else:
            self.recorded.append((self.step, {n: m.clone() for n, m in self.masks.items()}))


def test_schedule_and_partitions():
    assert gap_schedule(100, 3, 2, 10) == [(0, None, 0), (10, 0, 1), (20, 1, 2), (30, 2, 0), (40, 0, 1),
                                           (50, 1, 2), (60, 2, None)]
    assert split_contiguous(list("abcde"), 3) == [["a", "b"], ["c", "d"], ["e"]]
    model = mlp(0, hidden=16)
    method = GaP(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.9, total_steps=1200, partitions=3)
    # default: 3 cycles over the groups in the first 75% of training
    assert method.phase_steps == 100 and method.changes[-1] == (900, 2, None)
    assert method.groups == [["0"], ["2"], ["4"]] and method.dense_group == 0
    assert get_method("gap") is GaP


def test_mask_decisions_match_masked_dense_reference():
    data = digits(torch.float64)
    order = batch_order(data[0].shape[0], 32, 1)[:40]
    groups = [["0"], ["2"], ["4"]]

    ref_model = mlp(5, hidden=48, dtype=torch.float64)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=3e-3)
    ref = MaskedDenseGaP(ref_model, ref_opt, groups, 0.9, phase=5, n_phases=6, seed=7)
    run_steps(ref_model, ref_opt, data, order)

    model = mlp(5, hidden=48, dtype=torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    method = GaP(model, opt, sparsity=0.9, total_steps=40, partitions=3, cycles=2, phase_length=5, seed=7)
    got = [(0, method.masks())]

    def hook(*args):
        if method.history[-1]["step"] == method.step:
            got.append((method.step, method.masks()))

    opt.register_step_post_hook(hook)
    run_steps(model, opt, data, order)
    assert [s for s, _ in got] == [s for s, _ in ref.recorded] == [0, 5, 10, 15, 20, 25, 30]
    for (step, masks), (_, want) in zip(got, ref.recorded):
        for name, mask in masks.items():
            assert torch.equal(mask, want[name]), f"mask of {name} differs after step {step}"
    assert method.dense_group is None
    for name, layer in method.layers.items():
        torch.testing.assert_close(layer.to_dense().weight, ref.layers[name].weight, rtol=1e-9, atol=1e-12)


def test_grown_group_runs_dense_and_the_rest_sparse():
    model = cnn(0, channels=(8, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method = GaP(model, opt, sparsity=0.8, total_steps=20, partitions=3, cycles=1, phase_length=4)
    data = digits()
    order = batch_order(data[0].shape[0], 32, 1)
    assert isinstance(model[1], sk.SparseConv2d) and isinstance(model[3], sk.SparseConv2d)
    for j in range(3):
        dense = set(method.groups[j])
        for name, layer in method.layers.items():
            assert layer._full_row_major() == (name in dense), (j, name)
            assert opt.state.get(layer.values) is None or opt.state[layer.values]["momentum_buffer"].shape == \
                layer.values.shape
        run_steps(model, opt, data, order[4 * j:4 * j + 4])
    assert method.dense_group is None and [r["grown_group"] for r in method.history] == [0, 1, 2, None]
    for layer in method.layers.values():
        assert layer.nnz == max(1, round(0.2 * in_block_numel(layer)))
    method.remove()
    run_steps(model, opt, data, order[12:16])
    assert len(method.history) == 4


@pytest.mark.parametrize("stop", [7, 12])  # mid grow phase, at a boundary's next step
def test_resume_is_bit_identical(stop):
    data = digits()
    order = batch_order(data[0].shape[0], 32, 1)[:30]

    def fresh(seed):
        model = mlp(seed, hidden=32)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        return model, opt, GaP(model, opt, sparsity=0.85, total_steps=30, partitions=2, cycles=2, phase_length=5)

    model, opt, method = fresh(0)
    run_steps(model, opt, data, order)
    model2, opt2, method2 = fresh(0)
    run_steps(model2, opt2, data, order[:stop])
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "method": method2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model3, opt3, method3 = fresh(1)
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    method3.load_state_dict(saved["method"])
    assert method3.dense_group == method2.dense_group
    run_steps(model3, opt3, data, order[stop:])
    sd, sd3 = model.state_dict(), model3.state_dict()
    assert all(torch.equal(sd[k], sd3[k]) for k in sd)
    for p, p3 in zip(opt.param_groups[0]["params"], opt3.param_groups[0]["params"]):
        for k, v in opt.state[p].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt3.state[p3][k])), k
    assert method3.history == method.history


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_gap_at_least_as_accurate_as_static(arch):
    """At 90% (uniform per layer), the same steps, data order and optimizer."""
    data = digits()
    build = mlp if arch == "mlp" else cnn
    order = batch_order(data[0].shape[0], 32 if arch == "mlp" else 64, 20)
    total = len(order)
    acc = {}
    for kind in ("static", "gap"):
        model = build(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
        if kind == "gap":
            method = GaP(model, opt, sparsity=0.9, total_steps=total, partitions=3, distribution="uniform")
        else:
            method = Static(model, opt, sparsity=0.9, total_steps=total, distribution="uniform")
        run_steps(model, opt, data, order, sched)
        assert all(abs(layer.sparsity - 0.9) < 0.01 for layer in method.layers.values())
        acc[kind] = accuracy(model, data)
    assert acc["gap"] >= acc["static"], acc


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": -0.5}, "sparsity"),
    ({"partitions": 0}, "partitions"),
    ({"partitions": 4}, "partitions"),  # the MLP has 3 layers
    ({"cycles": 0}, "cycles"),
    ({"phase_length": 40}, "phase_length"),
    ({"phase_length": 0}, "phase_length"),
    ({"total_steps": 5}, "total_steps"),
    ({"total_steps": None}, "total_steps"),
    ({"finetune": 1.0}, "finetune"),
    ({"distribution": "global"}, "distribution"),
])
def test_bad_input(kwargs, match):
    model = mlp(0, hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        GaP(model, opt, **{"sparsity": 0.9, "total_steps": 100, "partitions": 3, **kwargs})
    assert isinstance(model[0], nn.Linear) and opt.param_groups[0]["params"][0] is model[0].weight  # untouched
