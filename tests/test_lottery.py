"""Lottery tickets (IMP): mask decisions against an independent masked-dense IMP written
here (every criterion, both scopes, the output-layer rate, late rewinding, conv layers),
rewinding keeps the layers sparse, bit-identical resume between and inside rounds,
argument checks, and the digits acceptance: the rewound ticket beats the same mask
re-initialised."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sparsekernels import SparseConv2d, SparseLinear
from sparsekernels.methods import LotteryTicket

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("pinned_backend")]


# --------------------------------------------------------------------------- models and data
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 5)).double()


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1, groups=2),
                         nn.Tanh(), nn.Flatten(), nn.Linear(6 * 5 * 5, 5)).double()


def _batches(kind, n, seed=1, batch=16):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 12) if kind == "mlp" else (batch, 3, 5, 5)
    return [(torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(n)]


def _adam(params):
    return torch.optim.Adam(params, lr=0.02)


# --------------------------------------------------------------------------- masked-dense IMP
class MaskedDenseIMP:
    """IMP written plainly on the dense model: a 0/1 mask per weight, the forward on W * M,
    the criteria of Zhou et al. on the dense tensors, the prune by a stable argsort
    (numpy) over the kept positions in layer order, rewinding by copying the dense start
    weights. Nothing from sparsekernels is used."""

    def __init__(self, model, *, prune_fraction, output_fraction, criterion, scope, rewind_step, seed):
        self.model, self.p, self.p_out = model, prune_fraction, output_fraction
        self.criterion, self.scope, self.rewind_step, self.seed = criterion, scope, rewind_step, seed
        self.names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.masks = {n: torch.ones_like(model.get_submodule(n).weight, dtype=torch.bool) for n in self.names}
        self.start = copy.deepcopy(model.state_dict()) if rewind_step in (0, None) else None
        self.round = 0

    def forward(self, x):
        params = {f"{n}.weight": self.model.get_submodule(n).weight * self.masks[n] for n in self.names}
        return functional_call(self.model, params, (x,))

    def train_round(self, batches, opt):
        for step, (x, y) in enumerate(batches, start=1):
            opt.zero_grad()
            F.cross_entropy(self.forward(x), y).backward()
            opt.step()
            if self.round == 0 and self.rewind_step and step == self.rewind_step:
                self.start = copy.deepcopy(self.model.state_dict())

    def _scores(self, name, g):
        wf = self.model.get_submodule(name).weight.detach()
        wi = self.start[f"{name}.weight"] if self.start is not None else None
        m = self.masks[name]
        if self.criterion == "large_final":
            s = wf.abs()
        elif self.criterion == "magnitude_increase":
            s = wf.abs() - wi.abs()
        elif self.criterion == "movement":
            s = (wf - wi).abs()
        elif self.criterion == "large_final_same_sign":
            s = torch.clamp(wi * wf / wi.abs(), min=0)
        else:  # random: one uniform draw per kept weight, layer by layer, row-major
            s = torch.zeros_like(wf)
            s[m] = torch.rand(int(m.sum()), generator=g, dtype=wf.dtype)
        return s[m].numpy()  # kept positions, row-major

    def prune_and_rewind(self):
        g = torch.Generator().manual_seed(self.seed + self.round)
        scores = {n: self._scores(n, g) for n in self.names}
        out, others = self.names[-1], self.names[:-1]
        groups = [[out]] + ([[n] for n in others] if self.scope == "layer" else [others])
        for group in groups:
            flat = np.concatenate([scores[n] for n in group])
            frac = self.p_out if group == [out] else self.p
            drop = np.argsort(flat, kind="stable")[:int(round(frac * flat.size))]
            keep = np.ones(flat.size, dtype=bool)
            keep[drop] = False
            offset = 0
            for n in group:
                count = scores[n].size
                m = self.masks[n]
                idx = m.reshape(-1).nonzero().squeeze(1)
                m.view(-1)[idx[torch.from_numpy(~keep[offset:offset + count])]] = False
                offset += count
        if self.rewind_step is not None:
            self.model.load_state_dict(self.start)
        self.round += 1


def _sparse_weight(layer):
    return layer.dense_weight() if isinstance(layer, SparseConv2d) else layer.csr().to_dense()


CASES = [(c, s) for c in ("large_final", "magnitude_increase", "movement", "large_final_same_sign", "random")
         for s in ("global", "layer")]


@pytest.mark.parametrize("criterion,scope", CASES)
def test_mask_decisions_equal_masked_dense_imp(criterion, scope):
    _compare_with_masked_dense("mlp", criterion, scope, rewind_step=0)


@pytest.mark.parametrize("rewind_step", [3, None])
def test_late_rewinding_and_fine_tuning_equal_masked_dense_imp(rewind_step):
    _compare_with_masked_dense("mlp", "magnitude_increase", "global", rewind_step=rewind_step)


def test_conv_layers_equal_masked_dense_imp():
    _compare_with_masked_dense("cnn", "large_final", "layer", rewind_step=0)


def _compare_with_masked_dense(kind, criterion, scope, rewind_step, rounds=4, steps=5):
    make = _mlp if kind == "mlp" else _cnn
    ref_model = make()
    model = copy.deepcopy(ref_model)
    lt = LotteryTicket(model, _adam, prune_fraction=0.3, rounds=rounds, rewind_step=rewind_step,
                       criterion=criterion, scope=scope, output_prune_fraction=0.15, seed=7)
    ref = MaskedDenseIMP(ref_model, prune_fraction=0.3, output_fraction=0.15, criterion=criterion, scope=scope,
                         rewind_step=rewind_step, seed=7)
    assert list(lt.layers) == ref.names and lt.output_layer == ref.names[-1]
    batches = _batches(kind, steps)
    for rnd in lt.rounds():
        if rnd.index:
            ref.prune_and_rewind()
        for name, layer in lt.layers.items():
            assert isinstance(layer, SparseLinear if ref.masks[name].dim() == 2 else SparseConv2d)
            assert torch.equal(layer.mask(), ref.masks[name]), f"round {rnd.index}: mask of {name} differs"
            dense = ref_model.get_submodule(name).weight.detach() * ref.masks[name]
            torch.testing.assert_close(_sparse_weight(layer), dense, rtol=1e-10, atol=1e-12)
        total = sum(m.numel() for m in ref.masks.values())
        assert rnd.sparsity == pytest.approx(1 - sum(int(m.sum()) for m in ref.masks.values()) / total)
        for x, y in batches:
            rnd.optimizer.zero_grad()
            F.cross_entropy(rnd.model(x), y).backward()
            rnd.optimizer.step()
        ref.train_round(batches, _adam(ref_model.parameters()))
    # Output layer at its own rate: 15% of the remaining per prune, every other layer 30%.
    out = lt.layers[lt.output_layer]
    n = math.prod(ref.masks[lt.output_layer].shape)
    for _ in range(rounds - 1):
        n -= round(0.15 * n)
    assert out.nnz == n
    assert [r["round"] for r in lt.history] == list(range(rounds))
    assert all(r["nnz"] == {k: int(m.sum()) for k, m in ref.masks.items()} for r in lt.history[-1:])


def test_rewinding_keeps_layers_sparse_with_initial_values():
    model = _mlp()
    init = copy.deepcopy(model)
    lt = LotteryTicket(model, _adam, prune_fraction=0.5, rounds=3)
    batches = _batches("mlp", 4)
    nnz_seen = []
    for rnd in lt.rounds():
        for name, layer in lt.layers.items():
            assert type(layer) is SparseLinear
            mask = layer.mask()
            # The rewound values are theta_0 at the kept positions, and only those are stored.
            assert layer.nnz == int(mask.sum())
            assert torch.equal(layer.values.detach(), init.get_submodule(name).weight.detach()[mask])
            assert torch.equal(layer.bias.detach(), init.get_submodule(name).bias.detach())
        nnz_seen.append(sum(rnd.nnz.values()))
        for x, y in batches:
            rnd.optimizer.zero_grad()
            F.cross_entropy(rnd.model(x), y).backward()
            rnd.optimizer.step()
    assert nnz_seen[0] == 12 * 32 + 32 * 24 + 24 * 5 and nnz_seen[0] > nnz_seen[1] > nnz_seen[2]
    # The rewind point holds one value per stored weight: no dense copy.
    assert {n: t.numel() for n, t in lt._start.items()} == lt.layer_nnz()


# --------------------------------------------------------------------------- resume
def _run(stop=None, state=None, rounds=3, steps=6):
    """Trains a small float32 IMP (late rewinding to step 2, a StepLR per round). ``stop``
    = (round, step): returns the saved states there. ``state``: resumes from them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5))
    lt = LotteryTicket(model, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), prune_fraction=0.4,
                       rounds=rounds, rewind_step=2, criterion="movement",
                       scheduler_fn=lambda o, r: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5), record_masks=True)
    if state is not None:
        model.load_state_dict(state["model"])
        lt.load_state_dict(state["lt"])
    batches = [(x.float(), y) for x, y in _batches("mlp", steps, seed=3)]
    for rnd in lt.rounds():
        if state is not None and rnd.index == state["lt"]["round"]:
            rnd.optimizer.load_state_dict(state["opt"])
            rnd.scheduler.load_state_dict(state["sched"])
        for i, (x, y) in enumerate(batches):
            if i < rnd.step:
                continue
            if stop == (rnd.index, i):
                return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(rnd.optimizer.state_dict()),
                        "sched": rnd.scheduler.state_dict(), "lt": lt.state_dict()}
            rnd.optimizer.zero_grad()
            F.cross_entropy(rnd.model(x), y).backward()
            rnd.optimizer.step()
            rnd.scheduler.step()
        if stop == (rnd.index, len(batches)):
            return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(rnd.optimizer.state_dict()),
                    "sched": rnd.scheduler.state_dict(), "lt": lt.state_dict()}
    return model, lt


@pytest.mark.parametrize("stop", [(0, 1), (0, 4), (1, 0), (1, 3), (1, 6)],
                         ids=["round0-before-theta_k", "round0-after-theta_k", "start-of-round1", "inside-round1",
                              "end-of-round1"])
def test_resume_between_and_inside_rounds_is_bit_identical(stop):
    want_model, want_lt = _run()
    state = _run(stop=stop)
    state = copy.deepcopy(state)  # nothing shared with the stopped run
    got_model, got_lt = _run(state=state)
    want, got = want_model.state_dict(), got_model.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert got_lt.history == want_lt.history
    assert len(got_lt.mask_history) == len(want_lt.mask_history) == 3
    for a, b in zip(got_lt.mask_history, want_lt.mask_history):
        assert all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]) for n in a)


# --------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("kwargs,match", [
    ({"prune_fraction": 0.0}, "prune_fraction"),
    ({"prune_fraction": 1.0}, "prune_fraction"),
    ({"prune_fraction": True}, "prune_fraction"),
    ({"rounds": 0}, "rounds"),
    ({"criterion": "smallest"}, "criterion"),
    ({"scope": "block"}, "scope"),
    ({"rewind_step": -1}, "rewind_step"),
    ({"output_prune_fraction": 1.0}, "output_prune_fraction"),
    ({"output_layer": "nope"}, "output_layer"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    args = {"rounds": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        LotteryTicket(_mlp(), _adam, **args)


def test_rewind_step_beyond_the_first_round_is_reported_when_it_ends():
    lt = LotteryTicket(_mlp(), _adam, rounds=2, rewind_step=10)
    it = lt.rounds()
    rnd = next(it)
    for x, y in _batches("mlp", 3):
        rnd.optimizer.zero_grad()
        F.cross_entropy(rnd.model(x), y).backward()
        rnd.optimizer.step()
    with pytest.raises(ValueError, match=r"rewind_step \(10\) is beyond the first round's length \(3"):
        next(it)


def test_load_state_dict_rejects_another_configuration():
    lt = LotteryTicket(_mlp(), _adam, rounds=3)
    other = LotteryTicket(_mlp(), _adam, rounds=3, criterion="movement")
    with pytest.raises(ValueError, match="criterion"):
        other.load_state_dict(lt.state_dict())
    with pytest.raises(TypeError, match="state"):
        lt.load_state_dict([1])


# --------------------------------------------------------------------------- digits acceptance
def test_imp_ticket_beats_reinitialised_mask_on_digits(tmp_path):
    """MLP 64-512-512-10 on digits, IMP rewound to theta_0: 5 rounds pruning 55% of the
    remaining weights per round (the output layer 27.5%), so the last round trains at
    ~95.5% sparsity of the whole network, instead of 15 rounds of 20%, to fit the test
    budget; 2 epochs per round. The control trains the last mask from a fresh init of the
    same distribution on the same batches (Frankle & Carbin's "reinit")."""
    pytest.importorskip("sklearn")
    from sparsekernels.bench.lottery_curve import imp_curve, plot_imp_curve

    result = imp_curve(rounds=5, prune_fraction=0.55, epochs=2, reinit_rounds=[4], progress=False)
    final = result["sparsity"][-1]
    assert 0.95 <= final <= 0.98
    assert result["rewound"][0] > 85  # the dense network learns digits in 2 epochs
    gap = result["rewound"][-1] - result["reinit"][4]
    assert gap >= 2.0, f"ticket {result['rewound'][-1]:.1f}% vs reinit {result['reinit'][4]:.1f}% at {final:.3f}"
    png = plot_imp_curve(result, str(tmp_path / "imp.png"))
    assert (tmp_path / "imp.png").stat().st_size > 10_000 and png.endswith("imp.png")
