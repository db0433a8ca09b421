"""Method state dicts are checked whole before anything is restored (a failed load leaves
the method as it was), saved schedule entries are validated by value, and the drivers
outside the base class (SRSTE, CrAM, LotteryTicket, LearnedSupermask, DSTEnsemble) refuse
bad states and arguments by name. Found by a review of resume edge cases (12-03)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from sparsekernels.methods import ACDC, EDST, GMP, SRSTE, CrAM, DSTEnsemble, LearnedSupermask, LotteryTicket, RigL
from sparsekernels.methods.suptickets import SupTickets


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _train(model, optimizer, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
        optimizer.step()


def _fingerprint(method):
    """What a load restores or derives, compared by value."""
    return copy.deepcopy({k: v for k, v in vars(method).items()
                          if k not in ("model", "optimizer", "layers", "_hook") and not k.startswith("_gathered")})


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


_CASES = {
    "gmp": (lambda m, o: GMP(m, o, total_steps=40, update_interval=3),
            [{"distribution": "bogus"}, {"end_step": 0}]),
    "rigl": (lambda m, o: RigL(m, o, total_steps=40, update_interval=3),
             [{"t_end": None}, {"distribution": "bogus"}, {"step": -1}]),
    "edst": (lambda m, o: EDST(m, o, total_steps=40, update_interval=3),
             [{"num_tickets": 30}, {"num_tickets": True}, {"total_steps": None}, {"base_lrs": []},
              {"base_lrs": "x"}, {"lr_reset": "no"}, {"tickets": "x"}]),
    "suptickets": (lambda m, o: SupTickets(m, o, total_steps=40, update_interval=3),
                   [{"cycles": 30}, {"total_steps": None}, {"reexplore_fraction": 5.0}, {"lr1": "x"},
                    {"explore": "bogus"}, {"superposed": "x"}, {"budget": -1}]),
    "acdc": (lambda m, o: ACDC(m, o, total_steps=40), [{"dense_snapshot": "garbage"}, {"phase_steps": 0}]),
}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_a_bad_state_is_refused_whole(name):
    build, bad_entries = _CASES[name]
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method = build(model, optimizer)
    _train(model, optimizer, 10)
    saved = method.state_dict()
    fresh_model = _mlp()
    fresh_opt = torch.optim.SGD(fresh_model.parameters(), lr=0.05, momentum=0.9)
    fresh = build(fresh_model, fresh_opt)
    before = _fingerprint(fresh)
    for bad in bad_entries:
        with pytest.raises((ValueError, TypeError)):
            fresh.load_state_dict({**saved, **bad})
        assert _equal(_fingerprint(fresh), before), f"{name}: {bad} left the method changed"
    fresh_model.load_state_dict(model.state_dict())
    fresh_opt.load_state_dict(optimizer.state_dict())
    fresh.load_state_dict(saved)  # the good state still loads after the refusals
    assert fresh.step == method.step and fresh.history == method.history


def test_gmp_reaches_every_layers_target_whatever_initial_sparsity():
    """GMP only prunes: a layer whose final target is below initial_sparsity (ERK keeps it
    denser) starts at its target; it had stayed at initial_sparsity and the model ended
    above its target."""
    for kwargs in ({"sparsity": 0.9, "initial_sparsity": 0.95},
                   {"sparsity": 0.8, "initial_sparsity": 0.5, "distribution": "erk"}):
        model = _mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        above = kwargs["initial_sparsity"] > kwargs["sparsity"]
        with pytest.warns(UserWarning, match="initial_sparsity .* is above sparsity") if above else \
                contextlib.nullcontext():
            gmp = GMP(model, optimizer, total_steps=40, update_interval=3, **kwargs)
        _train(model, optimizer, 40)
        for name, layer in gmp.layers.items():
            assert abs(layer.sparsity - gmp.final_sparsities[name]) < 0.02, (name, layer.sparsity)


def test_suptickets_loads_its_own_state_with_a_zero_learning_rate():
    """lr1 / lr2 may be 0 (a warm-up schedule at step 0 gives it): its own state loads."""
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    method = SupTickets(model, optimizer, total_steps=40, update_interval=3, lr1=0.0, lr2=0.0)
    method.load_state_dict(method.state_dict())


def test_srste_checks_its_state_and_restores_the_saved_settings():
    model = nn.Sequential(nn.Linear(16, 8))
    with pytest.raises(TypeError, match="transposable"):
        SRSTE(model, torch.optim.SGD(model.parameters(), lr=0.1), transposable="yes")
    method = SRSTE(model, torch.optim.SGD(model.parameters(), lr=0.1), update_every=2)
    saved = method.state_dict()
    counts = {n: layer._forwards for n, layer in method.layers.items()}
    for bad, match in (({"frozen": [1]}, "frozen"), ({"frozen": {"0": "no"}}, "frozen"),
                       ({"transposable": True}, "transposable"), ({"update_every": 0}, "update_every"),
                       ({"srste_lambda": float("nan")}, "srste_lambda"), ({"forwards": {"0": -1}}, "forward count")):
        with pytest.raises(ValueError, match=match):
            method.load_state_dict({**saved, **bad})
        assert {n: layer._forwards for n, layer in method.layers.items()} == counts
    method.load_state_dict({**saved, "update_every": 5, "srste_lambda": 1e-3})
    assert method.update_every == 5 and method.srste_lambda == 1e-3
    assert method.layers["0"].update_every == 2  # a layer keeps its own (its checkpoint holds them)


def test_cram_refuses_a_model_without_layers_and_checks_its_state_first():
    norms = nn.Sequential(nn.BatchNorm1d(16), nn.ReLU())
    with pytest.raises(ValueError, match="nothing to compress"):
        CrAM(torch.optim.SGD(norms.parameters(), lr=0.1), norms)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    cram = CrAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)

    def closure():
        cram.zero_grad()
        loss = model(torch.randn(8, 16)).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        cram.step(closure)
    saved = cram.state_dict()
    momentum = saved["state"][0]["momentum_buffer"].clone()
    for bad, match in (({"generator": "x"}, "generator"), ({"steps": -3}, "steps"), ({"rho": 0.5}, "rho"),
                       ({"sparsities": [0.3]}, "sparsities")):
        with pytest.raises(ValueError, match=match):
            cram.load_state_dict({**saved, "cram": {**saved["cram"], **bad}})
        assert torch.equal(cram.base_optimizer.state_dict()["state"][0]["momentum_buffer"], momentum)
        assert cram.steps == 3
    cram.load_state_dict(saved)


def test_lottery_ticket_checks_its_optimizer_and_its_state_first():
    model = _mlp()
    lt = LotteryTicket(model, lambda params: torch.optim.SGD(_mlp(1).parameters(), lr=0.1), rounds=2)
    with pytest.raises(ValueError, match="optimizer_fn"):
        next(lt.rounds())
    model = _mlp()
    lt = LotteryTicket(model, lambda params: torch.optim.SGD(params, lr=0.1), rounds=2, rewind_step=2)
    rounds = lt.rounds()  # held: a dropped generator closes and unhooks its round
    rnd = next(rounds)
    _train(model, rnd.optimizer, 3)
    assert lt.round_step == 3
    saved = lt.state_dict()
    before = (lt.round, lt.round_step, lt.in_round, copy.deepcopy(lt.history))
    for bad, match in (({"start_rest": "x"}, "start_rest"), ({"start_rest": {"k": 3}}, "start_rest"),
                       ({"history": "abc"}, "history"), ({"start": None}, "rewind point"),
                       ({"last_drop": 2.0}, "last_drop")):
        with pytest.raises(ValueError, match=match):
            lt.load_state_dict({**saved, **bad})
        assert (lt.round, lt.round_step, lt.in_round, lt.history) == before
    lt.load_state_dict(saved)


def test_learned_supermask_resumes_bit_identically_with_its_state_dict():
    def run(steps, resume_at=None):
        model = _mlp()
        sm = LearnedSupermask(model, sparsity=0.5, seed=3)
        opt = torch.optim.Adam(sm.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        batches = [torch.randn(8, 16, generator=g) for _ in range(steps)]
        for i, x in enumerate(batches):
            if i == resume_at:
                saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sm.state_dict()))
                model = _mlp()
                sm = LearnedSupermask(model, sparsity=0.5, seed=3)
                opt = torch.optim.Adam(sm.parameters(), lr=0.1)
                model.load_state_dict(saved[0])
                opt.load_state_dict(saved[1])
                sm.load_state_dict(saved[2])
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        return {n: l.scores.detach().clone() for n, l in sm.layers.items()}

    straight, resumed = run(10), run(10, resume_at=4)
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)
    sm = LearnedSupermask(_mlp(), sparsity=0.5)
    for bad, match in (({"method": "rigl"}, "method"), ({"generator": "x"}, "generator"),
                       ({"sparsity": 0.9}, "sparsity")):
        with pytest.raises(ValueError, match=match):
            sm.load_state_dict({**sm.state_dict(), **bad})


def test_dst_ensemble_loads_all_members_or_none():
    ens = DSTEnsemble(_mlp, lambda params: torch.optim.SGD(params, lr=0.1), members=2, total_steps=4,
                      sparsity=0.5)
    saved = ens.state_dict()
    before = [copy.deepcopy(m.state_dict()) for m, _, _ in ens.runs]
    other = DSTEnsemble(lambda: _mlp(5), lambda params: torch.optim.SGD(params, lr=0.1), members=2, total_steps=4,
                        sparsity=0.5).state_dict()
    broken = {"members": [other["members"][0], {**other["members"][1], "method": {"method": "set"}}]}
    with pytest.raises(ValueError):
        ens.load_state_dict(broken)
    for (model, _, _), old in zip(ens.runs, before):
        assert all(torch.equal(v, old[k]) for k, v in model.state_dict().items()), "member 0 was rolled back"
    with pytest.raises(ValueError, match="member 1"):
        ens.load_state_dict({"members": [saved["members"][0], {"model": {}}]})
    ens.load_state_dict(saved)


@pytest.mark.parametrize("cls", [RigL, "set"])
def test_an_update_interval_past_t_end_is_named(cls):
    """Updates every update_interval steps up to t_end: one past it never runs (the run is
    Static in all but name), which is almost always a configuration mistake."""
    from sparsekernels.methods import SET

    cls = SET if cls == "set" else cls
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(UserWarning, match=r"update_interval \(100\) is past t_end"):
        cls(model, optimizer, update_interval=100, total_steps=10)
    import warnings

    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past t_end")
        cls(model, optimizer, update_interval=5, total_steps=10)  # updates at step 5: no warning
