"""The methods' common API: wrapped optimizers, rollback of a failed attach, total_steps
everywhere, complete and validated method state dicts, attribute access after import."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from sparsekernels.methods import GMP, SET, SRSTE, RigL, Static
from sparsekernels.methods.base import unwrap_optimizer
from sparsekernels.nn import Sparse24Linear, SparseLinear


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=g), torch.randn(8, 4, generator=g)) for _ in range(n)]


def _step(model, opt, batch):
    x, y = batch
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def test_methods_reachable_after_import_in_a_fresh_process():
    code = ("import sys, sparsekernels\n"
            "assert sparsekernels.methods.RigL.__name__ == 'RigL'\n"
            "assert callable(sparsekernels.integrations.load_sparse_state_dict)\n"
            "assert sparsekernels.load_sparse_state_dict is sparsekernels.integrations.checkpoint.load_sparse_state_dict\n"
            "heavy = [m for m in ('lightning', 'transformers', 'accelerate', 'pytorch_lightning') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- wrapped optimizers
class _LightningLike:
    """Holds the optimizer in ``_optimizer`` and forwards step(), as Lightning's
    LightningOptimizer does (not an Optimizer subclass)."""

    def __init__(self, optimizer):
        self._optimizer = optimizer

    def step(self, closure=None):
        return self._optimizer.step(closure)


def test_unwrap_optimizer():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert unwrap_optimizer(opt) is opt
    assert unwrap_optimizer(_LightningLike(opt)) is opt
    assert unwrap_optimizer(_LightningLike(_LightningLike(opt))) is opt
    for bad in (None, "sgd", model, _LightningLike(None), _LightningLike("sgd")):
        with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
            unwrap_optimizer(bad)
    cyclic = _LightningLike(None)
    cyclic._optimizer = _LightningLike(cyclic)
    with pytest.raises(TypeError):
        unwrap_optimizer(cyclic)
    with pytest.raises(TypeError, match="RigL: optimizer must be"):
        RigL(model, "sgd", total_steps=10)
    assert isinstance(model[0], nn.Linear)


@pytest.fixture
def accelerate():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    yield accelerate
    # accelerate keeps process-wide singletons: later tests (a Trainer) build their own.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_accelerate_wrapped_optimizer_drives_the_method(accelerate):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, wrapped = accelerate.Accelerator().prepare(model, opt)
    assert type(wrapped).__name__ == "AcceleratedOptimizer" and unwrap_optimizer(wrapped) is opt
    method = SET(model, wrapped, sparsity=0.8, update_interval=2, total_steps=6)
    assert method.optimizer is opt
    assert all(isinstance(model[i], SparseLinear) for i in (0, 2, 4))
    held = {id(p) for g in wrapped.param_groups for p in g["params"]}
    assert all(id(layer.values) in held for layer in method.layers.values())
    masks0 = {n: m.clone() for n, m in method.masks().items()}
    for batch in _batches(4):
        _step(model, wrapped, batch)                   # the wrapper's step() runs the inner one
    assert method.step == 4 and [r["step"] for r in method.history] == [2, 4]
    assert any(not torch.equal(masks0[n], m) for n, m in method.masks().items())


def test_lightning_like_wrapper_drives_the_method():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    wrapped = _LightningLike(opt)
    method = RigL(model, wrapped, sparsity=0.7, update_interval=2, total_steps=8)
    for batch in _batches(2):
        x, y = batch
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        wrapped.step()
    assert method.step == 2 and len(method.history) == 1


# --------------------------------------------------------------------------- safe attach
def _optimizer_snapshot(opt):
    groups = [(g, list(g["params"]), {k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]
    state = {p: (s, dict(s)) for p, s in opt.state.items()}
    return list(opt.param_groups), groups, state


def _assert_optimizer_as_before(opt, snap):
    group_objs, groups, state = snap
    assert len(opt.param_groups) == len(group_objs) and all(a is b for a, b in zip(opt.param_groups, group_objs))
    for g, params, rest in groups:
        assert len(g["params"]) == len(params) and all(a is b for a, b in zip(g["params"], params))
        assert {k: v for k, v in g.items() if k != "params"} == rest
    assert set(opt.state) == set(state)
    for p, (s, items) in state.items():
        assert opt.state[p] is s and s.keys() == items.keys()
        assert all(s[k] is v for k, v in items.items())
    assert not opt._optimizer_step_post_hooks        # no hook left behind


def _failing_on_second(monkeypatch, cls):
    original = cls.from_dense.__func__
    calls = []

    def from_dense(klass, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in from_dense")
        return original(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_dense", classmethod(from_dense))
    return calls


@pytest.mark.parametrize("make, swapped", [
    (lambda m, o: RigL(m, o, sparsity=0.8, total_steps=10), SparseLinear),
    (lambda m, o: SET(m, o, sparsity=0.8), SparseLinear),
    (lambda m, o: Static(m, o, sparsity=0.8), SparseLinear),
    (lambda m, o: GMP(m, o, sparsity=0.8, total_steps=10), SparseLinear),
    (lambda m, o: SRSTE(m, o), Sparse24Linear),
], ids=["rigl", "set", "static", "gmp", "srste"])
def test_failed_attach_leaves_model_and_optimizer_as_before(make, swapped, monkeypatch):
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _step(model, opt, _batches(1)[0])                 # optimizer state exists
    modules = list(model.named_modules())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    snap = _optimizer_snapshot(opt)
    calls = _failing_on_second(monkeypatch, swapped)
    with pytest.raises(RuntimeError, match="injected failure"):
        make(model, opt)
    assert len(calls) == 2                             # it failed in the middle of the swap
    after = list(model.named_modules())
    assert [n for n, _ in after] == [n for n, _ in modules] and all(a is b for (_, a), (_, b) in zip(after, modules))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    _assert_optimizer_as_before(opt, snap)
    _step(model, opt, _batches(1)[0])                 # the dense model still trains


def test_failure_after_the_swap_is_rolled_back(monkeypatch):
    """A late failure (here GMP's per-layer targets, computed once the layers are sparse)
    undoes the completed swap too."""
    import sparsekernels.methods.gmp as gmp

    def broken(*args, **kwargs):
        raise ValueError("injected late failure")

    monkeypatch.setattr(gmp, "layer_sparsities", broken)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _step(model, opt, _batches(1)[0])
    modules = list(model.modules())
    snap = _optimizer_snapshot(opt)
    with pytest.raises(ValueError, match="injected late failure"):
        GMP(model, opt, sparsity=0.8, total_steps=10)
    assert all(a is b for a, b in zip(model.modules(), modules)) and isinstance(model[0], nn.Linear)
    _assert_optimizer_as_before(opt, snap)


# --------------------------------------------------------------------------- total_steps
@pytest.mark.parametrize("cls, extra", [(RigL, {}), (SET, {}), (GMP, {}), (Static, {}), (SRSTE, {})],
                         ids=["rigl", "set", "gmp", "static", "srste"])
def test_every_method_takes_total_steps(cls, extra):
    model = _mlp()
    method = cls(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=40, **extra)
    assert method.total_steps == 40
    for bad in (0, -5, 2.5, True, "40"):
        model = _mlp()
        with pytest.raises(ValueError, match="total_steps"):
            cls(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=bad)
        assert isinstance(model[0], nn.Linear)


def test_what_total_steps_sets():
    def opt_of(m):
        return torch.optim.SGD(m.parameters(), lr=0.1)

    m = _mlp()
    assert RigL(m, opt_of(m), total_steps=40).t_end == 30            # 75%, as before
    m = _mlp()
    assert GMP(m, opt_of(m), total_steps=40).end_step == 30
    m = _mlp()
    s = SET(m, opt_of(m), update_interval=5, total_steps=20)
    assert s.t_end == 20 and s.is_update_step(20) and not s.is_update_step(25)
    m = _mlp()
    s = SET(m, opt_of(m), update_interval=5)                       # neither: updates never stop
    assert s.t_end is None and s.total_steps is None and s.is_update_step(10**6)
    m = _mlp()
    s = SET(m, opt_of(m), update_interval=5, t_end=10, total_steps=20)
    assert s.t_end == 10 and not s.is_update_step(15)
    m = _mlp()
    assert Static(m, opt_of(m)).total_steps is None


# --------------------------------------------------------------------------- state dicts
def _run(make, model_seed, steps, start=0, ckpt=None):
    """Builds model + Adam + method; optionally restores ``ckpt``; trains ``steps`` batches
    starting at batch ``start``. Returns (model, opt, method)."""
    model = _mlp(model_seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    method = make(model, opt, seed=model_seed)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        method.load_state_dict(ckpt["method"])
    for batch in _batches(start + steps)[start:]:
        _step(model, opt, batch)
    return model, opt, method


@pytest.mark.parametrize("make", [
    lambda m, o, seed: SET(m, o, sparsity=0.75, update_interval=2, drop_fraction=0.4, total_steps=12, seed=seed),
    lambda m, o, seed: GMP(m, o, sparsity=0.9, update_interval=2, total_steps=12, seed=seed),
], ids=["set", "gmp"])
def test_resume_is_bit_identical(make):
    full_model, full_opt, full = _run(make, 0, 9)
    model, opt, method = _run(make, 0, 4)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "method": method.state_dict()})
    assert ckpt["method"]["total_steps"] == 12 and ckpt["method"]["step"] == 4
    # resumed in a run built with another seed and other initial weights: the checkpoint wins
    res_model, res_opt, resumed = _run(make, 7, 5, start=4, ckpt=ckpt)
    assert resumed.step == full.step == 9 and resumed.seed == 0
    assert resumed.history == full.history and len(full.history) >= 3
    for n, m in full.masks().items():
        assert torch.equal(m, resumed.masks()[n]), n
    a, b = full_model.state_dict(), res_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = full_opt.state_dict()["state"], res_opt.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_state_dict_holds_the_schedule():
    m = _mlp()
    rigl = RigL(m, torch.optim.SGD(m.parameters(), lr=0.1), sparsity=0.8, update_interval=3, drop_fraction=0.2,
                total_steps=40, seed=5)
    state = rigl.state_dict()
    assert {k: state[k] for k in ("method", "step", "seed", "sparsity", "distribution", "update_interval",
                                  "total_steps", "drop_fraction", "t_end")} == {
        "method": "rigl", "step": 0, "seed": 5, "sparsity": 0.8, "distribution": "erk", "update_interval": 3,
        "total_steps": 40, "drop_fraction": 0.2, "t_end": 30}
    m = _mlp()
    other = RigL(m, torch.optim.SGD(m.parameters(), lr=0.1), total_steps=100)
    other.load_state_dict(state)
    assert (other.t_end, other.total_steps, other.update_interval, other.drop_fraction) == (30, 40, 3, 0.2)


def test_load_state_dict_validates():
    m = _mlp()
    rigl = RigL(m, torch.optim.SGD(m.parameters(), lr=0.1), total_steps=40)
    good = rigl.state_dict()
    cases = [
        ({**good, "method": "set"}, "for method 'set'"),
        ({k: v for k, v in good.items() if k != "step"}, "lacks 'step'"),
        ({**good, "step": -1}, "step must be a non-negative int"),
        ({**good, "seed": 1.5}, "seed must be an int"),
        ({**good, "history": [{"step": 5, "layers": {}}]}, "steps <= step"),
        ({**good, "step": 6, "history": [{"step": 5, "layers": {"nope": {}}}]}, r"\['nope'\]"),
        ({**good, "t_end": 0}, "t_end must be a positive int"),
        ({**good, "drop_fraction": 2.0}, "drop_fraction"),
        ({**good, "sparsity": 1.0}, "sparsity"),
    ]
    for state, message in cases:
        with pytest.raises(ValueError, match=message):
            rigl.load_state_dict(state)
    with pytest.raises(TypeError, match="state must be a dict"):
        rigl.load_state_dict([("step", 1)])
    assert rigl.state_dict() == good                   # nothing was half-applied
    m = _mlp()
    gmp = GMP(m, torch.optim.SGD(m.parameters(), lr=0.1), total_steps=40)
    with pytest.raises(ValueError, match="end_step"):
        gmp.load_state_dict({**gmp.state_dict(), "start_step": 35})


def test_srste_state_round_trip():
    def build():
        m = _mlp()
        return m, SRSTE(m, torch.optim.SGD(m.parameters(), lr=0.1), update_every=3, total_steps=9)

    m, srste = build()
    for _ in range(4):
        m(torch.randn(2, 12)).sum().backward()
    srste.remove()
    state = srste.state_dict()
    assert state["total_steps"] == 9 and set(state["forwards"].values()) == {4}
    _, other = build()
    other.load_state_dict(state)
    assert other.state_dict() == state
    with pytest.raises(ValueError, match="must name the layers"):
        other.load_state_dict({**state, "forwards": {"x": 1}})
    with pytest.raises(ValueError, match="non-negative int"):
        other.load_state_dict({**state, "forwards": {n: -1 for n in state["forwards"]}})


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_a_method_says_when_it_adopts_sparse_layers_at_another_sparsity(distribution):
    """Layers the model holds sparse already are trained as they are: where one's sparsity
    is not the method's (under its distribution), a warning names it; at the same
    sparsity, nothing is said."""
    import warnings

    import sparsekernels

    model = sparsekernels.sparsify(_mlp(), sparsity=0.5)
    with pytest.warns(UserWarning, match=r"sparse already and are trained at their own sparsity.*\(0\.500, not"):
        RigL(model, torch.optim.Adam(model.parameters()), sparsity=0.9, distribution=distribution, total_steps=10)
    assert all(abs(m.sparsity - 0.5) < 1e-3 for m in model.modules() if isinstance(m, SparseLinear))
    same = sparsekernels.sparsify(_mlp(), sparsity=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SET(same, torch.optim.SGD(same.parameters(), lr=0.1), sparsity=0.9, distribution="uniform", total_steps=10,
            update_interval=5)


def test_every_method_has_a_history_list():
    """Code that treats the methods alike reads method.history: SRSTE has one too (empty,
    its masks follow the weights in every forward with no update step)."""
    for cls, kwargs in ((RigL, {"sparsity": 0.5}), (SET, {"sparsity": 0.5}), (GMP, {"sparsity": 0.5}),
                        (Static, {"sparsity": 0.5}), (SRSTE, {})):
        model = _mlp()
        method = cls(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=4, **kwargs)
        for batch in _batches(2):
            _step(model, method.optimizer, batch)
        assert isinstance(method.history, list)
        if cls is SRSTE:
            assert method.history == []
