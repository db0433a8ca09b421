"""Sparse-training methods: RigL against an independent masked-dense RigL, schedules, GMP,
ERK, SET, Static, history / remove, checkpoint resume, argument checks and DDP."""

from __future__ import annotations

import copy
import io
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekernels import SparseConv2d, SparseLinear, densify
from sparsekernels.methods import GMP, SET, MaskedDenseRigL, RigL, Static, cosine_drop_fraction, gmp_sparsity
from sparsekernels.nn import layer_sparsities

from tiny_task import mse_step
from two_ranks import init_gloo, run_two_ranks

SPARSE = (SparseLinear, SparseConv2d)


# A regression that loops forever (e.g. rejection sampling) fails instead of hanging.
pytestmark = pytest.mark.timeout(180)

# --------------------------------------------------------------------------- models and data
def _mlp(seed=0, act=nn.Tanh):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), act(), nn.Linear(32, 24), act(), nn.Linear(24, 5)).double()


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).double()


def _batches(kind, n, seed=1, batch=16):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 12) if kind == "mlp" else (batch, 3, 6, 6)
    return [(torch.randn(*shape, generator=g, dtype=torch.float64),
             torch.randn(batch, 5, generator=g, dtype=torch.float64)) for _ in range(n)]


OPTS = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
}


def _dense_weight(layer):
    return layer.dense_weight() if isinstance(layer, SparseConv2d) else layer.csr().to_dense()


# --------------------------------------------------------------------------- RigL vs masked dense
def _compare_rigl_with_masked_dense(make_model, kind, opt_name, steps=15, interval=3, t_end=20):
    dense = make_model()
    sparse = copy.deepcopy(dense)
    opt_s = OPTS[opt_name](sparse.parameters())
    rigl = RigL(sparse, opt_s, sparsity=0.8, distribution="erk", update_interval=interval, t_end=t_end)
    masks0 = {n: m.clone() for n, m in rigl.masks().items()}
    assert all(isinstance(m, SPARSE) for m in rigl.layers.values()) and len(masks0) >= 3
    opt_d = OPTS[opt_name](dense.parameters())
    ref = MaskedDenseRigL(dense, opt_d, masks0, update_interval=interval, drop_fraction=0.3, t_end=t_end)
    updates = 0
    for step, batch in enumerate(_batches(kind, steps), start=1):
        before = rigl.masks()
        mse_step(sparse, opt_s, batch)
        mse_step(dense, opt_d, batch)
        after = rigl.masks()
        for name in after:
            assert torch.equal(after[name], ref.masks[name]), f"step {step}: masks of '{name}' differ"
            torch.testing.assert_close(_dense_weight(rigl.layers[name]), dense.get_submodule(name).weight.detach(),
                                       rtol=1e-9, atol=1e-12)
        if step % interval == 0:
            updates += 1
            assert any(not torch.equal(before[n], after[n]) for n in after), f"update at {step} moved nothing"
        else:
            assert all(torch.equal(before[n], after[n]) for n in after)
    assert updates >= 4 and len(rigl.history) == updates
    # nnz per layer unchanged by RigL
    assert {n: int(m.sum()) for n, m in rigl.masks().items()} == {n: int(m.sum()) for n, m in masks0.items()}


@pytest.mark.parametrize("opt_name", list(OPTS))
def test_rigl_matches_masked_dense_mlp(opt_name):
    _compare_rigl_with_masked_dense(_mlp, "mlp", opt_name)


def test_rigl_matches_masked_dense_cnn():
    _compare_rigl_with_masked_dense(_cnn, "cnn", "sgd_momentum", steps=12, interval=3, t_end=16)


def test_rigl_matches_masked_dense_with_zero_gradient_ties():
    """Inputs whose features are mostly exactly zero (always-zero pixels, dead ReLUs) give
    many inactive positions with a gradient of exactly 0. When RigL's grow count reaches
    into them, the masked-dense definition (and topk_grow's documented rule) takes the
    earliest positions; the sparse RigL must pick the same ones."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(40, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    sparse = copy.deepcopy(dense)
    opt_s = torch.optim.SGD(sparse.parameters(), lr=0.05)
    rigl = RigL(sparse, opt_s, sparsity=0.5, distribution="uniform", update_interval=2, t_end=40,
                drop_fraction=0.9)
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.05)
    ref = MaskedDenseRigL(dense, opt_d, rigl.masks(), update_interval=2, drop_fraction=0.9, t_end=40)
    g = torch.Generator().manual_seed(3)
    for step in range(1, 7):
        x = torch.randn(8, 40, generator=g, dtype=torch.float64)
        x[:, 4:] = 0.0                       # 36 of the 40 input features are always 0
        y = torch.randn(8, 5, generator=g, dtype=torch.float64)
        mse_step(sparse, opt_s, (x, y))
        mse_step(dense, opt_d, (x, y))
        for name, m in rigl.masks().items():
            assert torch.equal(m, ref.masks[name]), f"step {step}: masks of '{name}' differ"


# --------------------------------------------------------------------------- schedules
def test_cosine_drop_fraction():
    a, t_end = 0.3, 100
    assert cosine_drop_fraction(0, a, t_end) == pytest.approx(a, abs=1e-15)
    assert cosine_drop_fraction(50, a, t_end) == pytest.approx(a / 2, abs=1e-15)
    assert cosine_drop_fraction(25, a, t_end) == pytest.approx(a / 2 * (1 + math.sqrt(0.5)), abs=1e-15)
    assert cosine_drop_fraction(100, a, t_end) == pytest.approx(0.0, abs=1e-15)
    assert cosine_drop_fraction(101, a, t_end) == 0.0
    assert cosine_drop_fraction(10**6, a, t_end) == 0.0
    values = [cosine_drop_fraction(t, a, t_end) for t in range(0, 101)]
    assert all(x >= y for x, y in zip(values, values[1:]))


def test_gmp_sparsity():
    si, sf, start, end = 0.1, 0.9, 10, 50
    assert gmp_sparsity(start, si, sf, start, end) == si
    assert gmp_sparsity(0, si, sf, start, end) == si
    assert gmp_sparsity(end, si, sf, start, end) == sf
    assert gmp_sparsity(end + 7, si, sf, start, end) == sf
    assert gmp_sparsity(30, si, sf, start, end) == pytest.approx(sf + (si - sf) * 0.5**3, abs=1e-15)
    assert gmp_sparsity(20, si, sf, start, end) == pytest.approx(sf + (si - sf) * 0.75**3, abs=1e-15)
    values = [gmp_sparsity(t, si, sf, start, end) for t in range(0, 60)]
    assert all(x <= y for x, y in zip(values, values[1:]))


def _kept(numel, s):
    return max(1, min(numel, int(round((1.0 - s) * numel))))


def test_gmp_method_follows_the_schedule():
    model = _mlp()
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    start, end, interval, sf = 2, 12, 2, 0.8
    gmp = GMP(model, opt, sparsity=sf, start_step=start, end_step=end, update_interval=interval,
              distribution="uniform")
    numel = {n: math.prod(m.mask().shape) for n, m in gmp.layers.items()}
    assert {n: m.nnz for n, m in gmp.layers.items()} == numel          # starts dense (s_i = 0)
    snap = {}

    def pre_hook(optimizer, args, kwargs):  # the values the update will see: v - lr * grad
        snap.clear()
        for n, m in gmp.layers.items():
            snap[n] = (m.mask().clone(), m.values.detach().add(m.values.grad, alpha=-lr))
    opt.register_step_pre_hook(pre_hook)

    update_steps = []
    for step, batch in enumerate(_batches("mlp", 16), start=1):
        nnz_before = {n: m.nnz for n, m in gmp.layers.items()}
        mse_step(model, opt, batch)
        scheduled = start <= step <= end and (step - start) % interval == 0
        if scheduled:
            update_steps.append(step)
        for n, m in gmp.layers.items():
            if scheduled:
                p = (step - start) / (end - start)
                s_t = sf + (0.0 - sf) * (1 - p) ** 3
                assert m.nnz == _kept(numel[n], s_t), (step, n)
                # the survivors are the largest magnitudes of the post-step values
                old_mask, post = snap[n]
                mags = post.abs().tolist()
                order = sorted(range(len(mags)), key=lambda i: (mags[i], i))
                keep = torch.ones(len(mags), dtype=torch.bool)
                keep[order[: len(mags) - m.nnz]] = False
                flat = old_mask.reshape(-1).nonzero().flatten()
                expected = torch.zeros(old_mask.numel(), dtype=torch.bool)
                expected[flat[keep]] = True
                assert torch.equal(m.mask().reshape(-1), expected), (step, n)
            else:
                assert m.nnz == nnz_before[n], (step, n)
    assert [r["step"] for r in gmp.history] == update_steps == [2, 4, 6, 8, 10, 12]
    for n, m in gmp.layers.items():
        assert m.nnz == _kept(numel[n], sf)


# --------------------------------------------------------------------------- ERK
ERK_SHAPES = {
    "mlp": {"a": (32, 12), "b": (24, 32), "c": (5, 24)},
    "cnn": {"c1": (8, 3, 3, 3), "c2": (8, 4, 3, 3), "fc": (5, 288)},
    "mixed": {"stem": (16, 3, 7, 7), "mid": (64, 16, 3, 3), "wide": (512, 1024), "head": (10, 512),
              "tiny": (4, 2)},
}


@pytest.mark.parametrize("model", list(ERK_SHAPES))
@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.98])
def test_erk_hits_the_global_target(model, target):
    shapes = ERK_SHAPES[model]
    per = layer_sparsities(shapes, target, "erk")
    numel = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(numel.values())
    kept = sum((1 - per[n]) * numel[n] for n in shapes)
    assert abs(kept / total - (1 - target)) < 1e-9
    # ERK: densities proportional to sum(shape) / prod(shape), except layers capped at dense
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    free = [n for n in shapes if per[n] > 1e-12]
    capped = [n for n in shapes if per[n] <= 1e-12]
    assert free
    ratios = [(1 - per[n]) / raw[n] for n in free]
    assert max(ratios) - min(ratios) < 1e-9 * max(ratios)
    if capped:
        assert min(raw[n] for n in capped) >= max(raw[n] for n in free)
    assert all(0.0 <= s < 1.0 for s in per.values())


def test_erk_caps_a_layer_at_dense():
    per = layer_sparsities(ERK_SHAPES["mixed"], 0.5, "erk")
    assert per["tiny"] == 0.0 and per["wide"] > 0.5


@pytest.mark.parametrize("make, target", [(_mlp, 0.8), (_cnn, 0.9), (_cnn, 0.5)])
def test_rigl_uses_erk(make, target):
    model = make()
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rigl = RigL(model, opt, sparsity=target, distribution="erk", total_steps=100)
    per = layer_sparsities(shapes, target, "erk")
    assert set(rigl.layers) == set(shapes)
    for n, layer in rigl.layers.items():
        assert abs(layer.nnz - (1 - per[n]) * math.prod(shapes[n])) <= 1.0, n
        assert int(rigl.masks()[n].sum()) == layer.nnz
    total = sum(math.prod(s) for s in shapes.values())
    assert abs(sum(layer.nnz for layer in rigl.layers.values()) - (1 - target) * total) <= len(shapes)


# --------------------------------------------------------------------------- SET
def _run_set(seed, steps=12, model_seed=0, start_from=None):
    model = _mlp(model_seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method = SET(model, opt, sparsity=0.8, update_interval=3, drop_fraction=0.3, seed=seed)
    if start_from is not None:          # another run's initial pattern and values
        model.load_state_dict(start_from)
    start = copy.deepcopy(model.state_dict())
    trace = [method.masks()]
    for batch in _batches("mlp", steps):
        mse_step(model, opt, batch)
        trace.append({n: m.clone() for n, m in method.masks().items()})
    return method, trace, start


def test_set_updates():
    method, trace, _ = _run_set(seed=4)
    nnz0 = {n: int(m.sum()) for n, m in trace[0].items()}
    assert len(method.history) == 4
    for step in range(1, len(trace)):
        prev, cur = trace[step - 1], trace[step]
        assert {n: int(m.sum()) for n, m in cur.items()} == nnz0
        if step % 3 == 0:
            for n in cur:
                gone = prev[n] & ~cur[n]
                new = cur[n] & ~prev[n]
                assert gone.any() and new.any(), (step, n)       # positions really moved
                rec = method.history[step // 3 - 1]["layers"][n]
                assert rec["dropped"] == rec["grown"] == int(0.3 * nnz0[n])
                assert rec["new"] == int(new.sum())
                assert rec["nnz"] == nnz0[n] and rec["mean_grow_score"] is None
        else:
            assert all(torch.equal(prev[n], cur[n]) for n in cur)


def test_set_is_reproducible_and_seed_dependent():
    _, a, start = _run_set(seed=4)
    _, b, _ = _run_set(seed=4)
    assert all(torch.equal(x[n], y[n]) for x, y in zip(a, b) for n in x)
    # another seed from the very same initial pattern and values: identical until the first
    # update, then the random growth differs
    _, c, _ = _run_set(seed=5, model_seed=1, start_from=start)
    assert all(torch.equal(a[i][n], c[i][n]) for i in range(3) for n in a[i])
    assert any(not torch.equal(a[3][n], c[3][n]) for n in a[3])


# --------------------------------------------------------------------------- Static
def test_static_masks_never_change():
    model = _cnn()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    method = Static(model, opt, sparsity=0.7)
    masks = {n: m.clone() for n, m in method.masks().items()}
    values = {n: m.values.detach().clone() for n, m in method.layers.items()}
    for batch in _batches("cnn", 6):
        mse_step(model, opt, batch)
        assert all(torch.equal(m, masks[n]) for n, m in method.masks().items())
    assert method.history == []
    for n, layer in method.layers.items():
        assert not torch.equal(layer.values.detach(), values[n])       # the values trained


# --------------------------------------------------------------------------- history and remove
def test_rigl_history_against_an_independent_update():
    """Each update's record matches a from-scratch RigL step: drop the f(t) * nnz smallest
    post-step values, grow the same number of largest dense |grad| positions."""
    model = _mlp()
    lr, interval, t_end = 0.05, 2, 12
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rigl = RigL(model, opt, sparsity=0.8, update_interval=interval, t_end=t_end)
    for step, batch in enumerate(_batches("mlp", 16), start=1):
        # independent dense gradient of this step
        replica = densify(copy.deepcopy(model))
        F.mse_loss(replica(batch[0]), batch[1]).backward()
        dense_grads = {n: replica.get_submodule(n).weight.grad.detach() for n in rigl.layers}
        pre = {n: (m.mask().clone(), m.values.detach().clone()) for n, m in rigl.layers.items()}
        n_hist = len(rigl.history)
        mse_step(model, opt, batch)
        if step % interval or step > t_end:          # no update off-schedule or after t_end
            assert len(rigl.history) == n_hist
            assert all(torch.equal(m.mask(), pre[n][0]) for n, m in rigl.layers.items())
            continue
        rec = rigl.history[-1]
        assert rec["step"] == step and len(rigl.history) == n_hist + 1
        f = 0.3 / 2 * (1 + math.cos(math.pi * step / t_end))
        for n, layer in rigl.layers.items():
            old_mask, old_vals = pre[n]
            grad_vals = dense_grads[n][old_mask]
            post = old_vals - lr * grad_vals
            k = int(f * old_vals.numel())
            mags = post.abs().tolist()
            drop = sorted(range(len(mags)), key=lambda i: (mags[i], i))[:k]
            flat_active = old_mask.reshape(-1).nonzero().flatten()
            after_drop = old_mask.reshape(-1).clone()
            after_drop[flat_active[drop]] = False
            score = dense_grads[n].abs().reshape(-1).tolist()
            cand = sorted((-score[i], i) for i in range(len(score)) if not after_drop[i])[:k]
            new_mask = after_drop.clone()
            new_mask[[i for _, i in cand]] = True
            assert torch.equal(layer.mask().reshape(-1), new_mask), (step, n)
            r = rec["layers"][n]
            assert r["nnz"] == old_vals.numel() == layer.nnz
            assert r["dropped"] == r["grown"] == k and (k > 0 or step == t_end)
            assert r["new"] == int((new_mask & ~old_mask.reshape(-1)).sum())
            if k:  # the record averages in float32
                assert r["mean_grow_score"] == pytest.approx(sum(-s for s, _ in cand) / k, rel=1e-6)
            else:
                assert r["mean_grow_score"] is None


def test_remove_stops_updates():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rigl = RigL(model, opt, sparsity=0.8, update_interval=2, total_steps=100)
    batches = _batches("mlp", 9)
    for b in batches[:3]:                 # an update at step 2; step 4 would be the next one
        mse_step(model, opt, b)
    assert len(rigl.history) == 1
    rigl.remove()
    masks = {n: m.clone() for n, m in rigl.masks().items()}
    for b in batches[3:]:
        mse_step(model, opt, b)
        for n, layer in rigl.layers.items():
            assert layer.captured() is None                  # no activations kept any more
    assert len(rigl.history) == 1 and rigl.step == 3
    assert all(torch.equal(m, masks[n]) for n, m in rigl.masks().items())


# --------------------------------------------------------------------------- checkpoint resume
def _build_rigl(model_seed, rigl_seed):
    model = _mlp(model_seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rigl = RigL(model, opt, sparsity=0.8, update_interval=2, total_steps=40, seed=rigl_seed)
    return model, opt, rigl


def _snapshot(model, opt, rigl):
    return ({n: m.clone() for n, m in rigl.masks().items()},
            {k: v.clone() for k, v in model.state_dict().items()},
            copy.deepcopy(opt.state_dict()["state"]))


def test_resume_is_bit_identical():
    batches = _batches("mlp", 13, seed=9)
    n_first = 5                                   # step 6 (the first after resume) is an update
    model, opt, rigl = _build_rigl(0, 0)
    for b in batches[:n_first]:
        mse_step(model, opt, b)
    assert len(rigl.history) == 2
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "method": rigl.state_dict()}, buf)
    at_save = rigl.masks()
    for b in batches[n_first:]:
        mse_step(model, opt, b)
    assert len(rigl.history) == 6
    masks_a, state_a, opt_a = _snapshot(model, opt, rigl)
    assert any(not torch.equal(masks_a[n], at_save[n]) for n in masks_a)

    # a fresh run: other initial weights, another initial mask (same nnz per layer)
    model2, opt2, rigl2 = _build_rigl(1, 123)
    assert any(not torch.equal(rigl2.masks()[n], at_save[n]) for n in at_save)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    rigl2.load_state_dict(ckpt["method"])
    assert rigl2.step == n_first and len(rigl2.history) == 2
    assert all(torch.equal(rigl2.masks()[n], at_save[n]) for n in at_save)
    for b in batches[n_first:]:
        mse_step(model2, opt2, b)
    masks_b, state_b, opt_b = _snapshot(model2, opt2, rigl2)
    assert rigl2.history == rigl.history
    for n in masks_a:
        assert torch.equal(masks_a[n], masks_b[n]), n
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
    for i in opt_a:
        for k in opt_a[i]:
            assert torch.equal(opt_a[i][k], opt_b[i][k]), (i, k)


# --------------------------------------------------------------------------- bad arguments
def test_bad_arguments():
    def fresh():
        model = _mlp()
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    for kwargs in ({"sparsity": 1.0}, {"sparsity": 1.5}, {"sparsity": -0.1}, {"update_interval": 0},
                   {"update_interval": -3}, {"drop_fraction": 1.5}, {"drop_fraction": -0.1},
                   {"distribution": "nope"}):
        model, opt = fresh()
        with pytest.raises(ValueError):
            RigL(model, opt, total_steps=100, **kwargs)
        assert isinstance(model[0], nn.Linear)               # nothing was swapped
    model, opt = fresh()
    with pytest.raises(ValueError, match="total_steps"):
        RigL(model, opt)
    for kwargs in ({"update_interval": 0}, {"drop_fraction": 1.5}, {"sparsity": 1.0}):
        model, opt = fresh()
        with pytest.raises(ValueError):
            SET(model, opt, **kwargs)
    model, opt = fresh()
    with pytest.raises(ValueError):
        GMP(model, opt, start_step=10, end_step=5)
    model, opt = fresh()
    with pytest.raises(ValueError):
        GMP(model, opt)                                      # neither end_step nor total_steps
    # an optimizer over another model's parameters
    model, _ = fresh()
    other = _mlp(1)
    with pytest.raises(ValueError, match="optimizer does not hold"):
        RigL(model, torch.optim.SGD(other.parameters(), lr=0.1), total_steps=100)
    assert isinstance(model[0], nn.Linear) and isinstance(other[0], nn.Linear)
    # no Linear / Conv2d layer
    plain = nn.Sequential(nn.Tanh(), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="no nn.Linear"):
        RigL(plain, torch.optim.SGD(plain.parameters(), lr=0.1), total_steps=100)
    with pytest.raises(ValueError):
        Static(plain, torch.optim.SGD(plain.parameters(), lr=0.1))
    # wrong types
    model, opt = fresh()
    with pytest.raises(TypeError):
        RigL("model", opt, total_steps=100)
    with pytest.raises(TypeError):
        RigL(model, "opt", total_steps=100)


# --------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    init_gloo(rank, world, port)
    try:
        model = _mlp(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        rigl = RigL(model, opt, sparsity=0.8, update_interval=2, total_steps=20)
        initial = {n: m.clone() for n, m in rigl.masks().items()}
        ddp = DDP(model)
        g = torch.Generator().manual_seed(100 + rank)          # different data on every rank
        for _ in range(8):
            x = torch.randn(8 + 4 * rank, 12, generator=g, dtype=torch.float64)  # and batch sizes
            y = torch.randn(8 + 4 * rank, 5, generator=g, dtype=torch.float64)
            opt.zero_grad(set_to_none=True)
            F.mse_loss(ddp(x), y).backward()
            opt.step()
        torch.save({"initial": initial, "masks": rigl.masks(), "history": rigl.history,
                    "values": {n: m.values.detach().clone() for n, m in rigl.layers.items()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_rigl_ddp_masks_agree_across_ranks(tmp_path):
    r0, r1 = run_two_ranks(_ddp_worker, tmp_path, timeout_s=120, what="DDP workers")
    assert len(r0["history"]) == len(r1["history"]) == 4
    assert [h["layers"] for h in r0["history"]] == [h["layers"] for h in r1["history"]]
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n], r1["masks"][n]), n
        assert torch.equal(r0["values"][n], r1["values"][n]), n
    assert any(not torch.equal(r0["masks"][n], r0["initial"][n]) for n in r0["masks"])
