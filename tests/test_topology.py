"""Topology primitives: drop_smallest, grow_random / grow_all / grow_by_gradient,
update_layer (pattern, values, transpose map) and the optimizer-state remap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsekernels import SparseConv2d, SparseLinear
from sparsekernels.formats import CSR
from sparsekernels.topology import (drop_smallest, grow_all, grow_by_gradient, grow_random, inactive_count,
                                    update_layer)


# A regression that loops forever (e.g. rejection sampling) fails instead of hanging.
pytestmark = pytest.mark.timeout(180)

# --------------------------------------------------------------------------- helpers
def _linear(in_f=14, out_f=11, sparsity=0.7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    layer = SparseLinear(in_f, out_f, sparsity=sparsity, generator=g, dtype=dtype)
    with torch.no_grad():
        layer.values.copy_(torch.randn(layer.nnz, generator=g, dtype=dtype))
    return layer


def _conv(groups=2, seed=0, sparsity=0.6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    layer = SparseConv2d(4, 6, 3, padding=1, groups=groups, sparsity=sparsity, generator=g, dtype=dtype)
    with torch.no_grad():
        layer.values.copy_(torch.randn(layer.nnz, generator=g, dtype=dtype))
    return layer


def _entries(layer):
    """[(row, col)] of the stored matrix's entries in storage order, from the raw buffers."""
    rp = layer.row_ptr.tolist()
    ci = layer.col_idx.tolist()
    return [(r, ci[e]) for r in range(len(rp) - 1) for e in range(rp[r], rp[r + 1])]


def _stored_dense(layer):
    """The stored matrix as a dense float64 tensor, from the raw buffers."""
    w = torch.zeros(layer.csr().shape, dtype=torch.float64)
    for (r, c), v in zip(_entries(layer), layer.values.detach().double().tolist()):
        w[r, c] = v
    return w


def _in_block(layer, r, c):
    groups, rpg, cpg = layer.groups_layout
    return r // rpg == c // cpg


def _all_positions(layer):
    groups, rpg, cpg = layer.groups_layout
    n_cols = layer.csr().shape[1]
    return [(r, c) for r in range(groups * rpg) for c in range(n_cols) if _in_block(layer, r, c)]


# --------------------------------------------------------------------------- drop_smallest
def _expected_drop(values, n):
    mags = values.abs().tolist()
    order = sorted(range(len(mags)), key=lambda i: (mags[i], i))
    keep = torch.ones(len(mags), dtype=torch.bool)
    keep[order[:n]] = False
    return keep


def test_drop_smallest_exact_set_with_ties():
    v = torch.tensor([0.5, -0.1, 0.3, 0.1, -0.5, 0.0, 2.0, -0.3, 0.1, 0.0, -1.0, 0.3])
    for n in range(v.numel() + 1):
        keep = drop_smallest(v, n)
        assert keep.dtype == torch.bool and keep.shape == v.shape
        assert int((~keep).sum()) == n
        assert torch.equal(keep, _expected_drop(v, n)), n
    # hand-checked: the two zeros (index 5 then 9), then |0.1| at 1, 3 (lower index first)
    assert (~drop_smallest(v, 3)).nonzero().flatten().tolist() == [1, 5, 9]
    assert (~drop_smallest(v, 4)).nonzero().flatten().tolist() == [1, 3, 5, 9]


def test_drop_smallest_random_and_edge_cases():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(200, generator=g, dtype=torch.float64)
    v[::7] = v[3]          # many exact ties
    for n in (0, 1, 17, 100, 199, 200):
        assert torch.equal(drop_smallest(v, n), _expected_drop(v, n))
    assert drop_smallest(v, 0).all()
    assert not drop_smallest(v, 200).any()
    assert drop_smallest(torch.empty(0), 0).numel() == 0
    for bad in (-1, 201, 1.5, True, None):
        with pytest.raises(ValueError):
            drop_smallest(v, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_drop_smallest_ranks_nan_inf_and_signed_ties_like_a_stable_sort(dtype):
    """fp32 / bf16 / fp16 go through the radix select on float bits, fp64 through a sort:
    |±0|, |±x| ties, inf and NaN (never dropped before every number is) rank the same."""
    g = torch.Generator().manual_seed(3)
    v = torch.randint(-4, 5, (301,), generator=g).to(dtype) / 2
    v[::11] = float("nan")
    v[5::13] = float("inf")
    v[7::17] = -float("inf")
    v[9::19] = -0.0
    # Ascending rank: |v| (NaN set aside), then NaN above every number; stable sorts keep
    # position order among ties.
    order = torch.sort(v.double().abs().nan_to_num(nan=0.0), stable=True).indices
    order = order[torch.sort(v.isnan()[order].int(), stable=True).indices]
    for n in (0, 1, 50, 150, 280, 301):
        want = torch.ones(301, dtype=torch.bool)
        want[order[:n]] = False
        assert torch.equal(drop_smallest(v, n), want), (dtype, n)


# --------------------------------------------------------------------------- grow_random
@pytest.mark.parametrize("kind", ["linear", "conv_groups2"])
def test_grow_random(kind):
    layer = _linear() if kind == "linear" else _conv(groups=2)
    entries = _entries(layer)
    keep = drop_smallest(layer.values, layer.nnz // 3)
    active_after = {e for e, k in zip(entries, keep.tolist()) if k}
    free = [p for p in _all_positions(layer) if p not in active_after]
    assert inactive_count(layer, keep) == len(free)
    assert inactive_count(layer) == len(_all_positions(layer)) - layer.nnz
    for n in (0, 1, 5, len(free) // 2, len(free)):
        rows, cols = grow_random(layer, n, torch.Generator().manual_seed(7), keep)
        assert rows.dtype == torch.int64 and cols.dtype == torch.int64
        got = list(zip(rows.tolist(), cols.tolist()))
        assert len(got) == n and len(set(got)) == n
        assert set(got) <= set(free)             # inactive after keep, in-block
        if n == len(free):
            assert set(got) == set(free)
        # deterministic for a seeded generator
        rows2, cols2 = grow_random(layer, n, torch.Generator().manual_seed(7), keep)
        assert torch.equal(rows, rows2) and torch.equal(cols, cols2)
    a = grow_random(layer, 10, torch.Generator().manual_seed(1), keep)
    b = grow_random(layer, 10, torch.Generator().manual_seed(2), keep)
    assert not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
    for bad in (-1, len(free) + 1, 2.0, True):
        with pytest.raises(ValueError):
            grow_random(layer, bad, torch.Generator().manual_seed(0), keep)


def test_grow_random_covers_the_inactive_positions_uniformly():
    layer = _linear(6, 5, sparsity=0.5)
    free = [p for p in _all_positions(layer) if p not in set(_entries(layer))]
    counts = dict.fromkeys(free, 0)
    gen = torch.Generator().manual_seed(3)
    trials = 600
    for _ in range(trials):
        rows, cols = grow_random(layer, 3, gen)
        for p in zip(rows.tolist(), cols.tolist()):
            counts[p] += 1
    expect = trials * 3 / len(free)
    assert all(0.5 * expect < c < 1.5 * expect for c in counts.values()), counts


@pytest.mark.parametrize("kind", ["linear", "conv_groups2"])
def test_grow_random_full_and_empty_rows(kind):
    """Rows with every in-block position active and rows with none, the keep mask emptying
    some more: every draw up to half the free positions stays inactive, in-block and
    distinct, and over seeds every free position is drawn (the numbering of the free
    positions misses none and invents none)."""
    layer = _linear(12, 9, sparsity=0.5) if kind == "linear" else _conv(groups=2, sparsity=0.5)
    groups, rpg, cpg = layer.groups_layout
    rows = groups * rpg
    mask = torch.zeros(rows, layer.csr().shape[1], dtype=torch.bool)
    for r in range(rows):
        block = slice((r // rpg) * cpg, (r // rpg + 1) * cpg)
        if r % 4 == 0:
            mask[r, block] = True                  # full row
        elif r % 4 == 1:
            pass                                   # empty row
        else:
            cols = torch.randperm(cpg, generator=torch.Generator().manual_seed(r))[: cpg // 2]
            mask[r, (r // rpg) * cpg + cols] = True
    dense = torch.randn(mask.shape, dtype=torch.float64) * mask
    layer.set_csr(CSR.from_dense(dense))
    keep = torch.arange(layer.nnz) % 5 != 0         # some active entries dropped
    active_after = {e for e, k in zip(_entries(layer), keep.tolist()) if k}
    free = {p for p in _all_positions(layer) if p not in active_after}
    seen = set()
    for seed in range(60):
        rows_, cols_ = grow_random(layer, len(free) // 2, torch.Generator().manual_seed(seed), keep)
        got = list(zip(rows_.tolist(), cols_.tolist()))
        assert len(set(got)) == len(got) == len(free) // 2
        assert set(got) <= free
        assert got == sorted(got)                  # row-major
        seen |= set(got)
    assert seen == free


# --------------------------------------------------------------------------- grow_all
@pytest.mark.parametrize("kind", ["linear", "conv_groups2", "conv_groups1"])
def test_grow_all(kind):
    layer = {"linear": _linear, "conv_groups2": lambda: _conv(2), "conv_groups1": lambda: _conv(1)}[kind]()
    entries = _entries(layer)
    keep = drop_smallest(layer.values, 4)
    for k in (None, keep):
        active = set(entries) if k is None else {e for e, kk in zip(entries, k.tolist()) if kk}
        rows, cols = grow_all(layer, k)
        got = list(zip(rows.tolist(), cols.tolist()))
        assert got == [p for p in _all_positions(layer) if p not in active]  # row-major
        assert len(got) == inactive_count(layer, k)


# --------------------------------------------------------------------------- grow_by_gradient
def _expected_grow(layer, x, dy, keep, n):
    g = (dy.double().t() @ x.double()).abs()
    entries = _entries(layer)
    active = {e for e, k in zip(entries, keep.tolist()) if k}
    n_cols = g.shape[1]
    cand = sorted((-g[r, c].item(), r * n_cols + c) for r, c in _all_positions(layer) if (r, c) not in active)
    return [(f // n_cols, f % n_cols) for _, f in cand[:n]], [-s for s, _ in cand[:n]]


@pytest.mark.parametrize("tile", [None, 5])
def test_grow_by_gradient_linear(tile):
    layer = _linear(13, 9, sparsity=0.6)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 13, generator=g, dtype=torch.float64)
    dy = torch.randn(7, 9, generator=g, dtype=torch.float64)
    keep = drop_smallest(layer.values, 6)
    n_free = inactive_count(layer, keep)
    for n in (0, 1, 6, 30, n_free):
        rows, cols, scores = grow_by_gradient(layer, x, dy, n, keep, tile_elems=tile)
        exp_pos, exp_scores = _expected_grow(layer, x, dy, keep, n)
        assert list(zip(rows.tolist(), cols.tolist())) == exp_pos
        torch.testing.assert_close(scores, torch.tensor(exp_scores, dtype=torch.float64))
    # without keep: the active positions are excluded
    rows, cols, _ = grow_by_gradient(layer, x, dy, 10)
    assert not layer.mask()[rows, cols].any()


def test_grow_by_gradient_grouped_conv_from_a_real_backward():
    """groups = 2: x / dy captured from an actual forward + backward; the scores must be the
    dense convolution's |dL/dW| (in-block positions only), the best n of them over all groups."""
    torch.manual_seed(0)
    layer = _conv(groups=2, sparsity=0.7)
    dense = layer.to_dense()
    inp = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    target = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    layer.capture_next(True)
    F.mse_loss(layer(inp), target, reduction="sum").backward()
    F.mse_loss(dense(inp), target, reduction="sum").backward()
    x, dy = layer.captured()
    assert x.shape == (2 * 25, 4 * 9) and dy.shape == (2 * 25, 6)
    # the captured product is the dense weight gradient on the block diagonal
    full = dy.t() @ x
    groups, rpg, cpg = layer.groups_layout
    assert (groups, rpg, cpg) == (2, 3, 18)
    for r in range(6):
        gidx = r // rpg
        torch.testing.assert_close(full[r, gidx * cpg:(gidx + 1) * cpg], dense.weight.grad[r].reshape(-1))
    keep = drop_smallest(layer.values, 5)
    n_free = inactive_count(layer, keep)
    for n in (1, 8, 40, n_free):
        rows, cols, scores = grow_by_gradient(layer, x, dy, n, keep, tile_elems=7)
        got = list(zip(rows.tolist(), cols.tolist()))
        assert all(_in_block(layer, r, c) for r, c in got)
        exp_pos, exp_scores = _expected_grow(layer, x, dy, keep, n)
        assert got == exp_pos, n
        torch.testing.assert_close(scores, torch.tensor(exp_scores, dtype=torch.float64))
        # the scores are |dL/dW| of the dense convolution at those positions
        w_grad = dense.weight.grad.reshape(6, cpg).abs()
        torch.testing.assert_close(scores, w_grad[rows, cols - (rows // rpg) * cpg])


# --------------------------------------------------------------------------- update_layer
def _update_case(layer, n_drop=5, n_regrow=2, n_new=6, seed=0):
    """keep-mask, grown positions (some dropped ones regrown + some new ones)."""
    entries = _entries(layer)
    keep = drop_smallest(layer.values, n_drop)
    dropped = [e for e, k in zip(entries, keep.tolist()) if not k]
    g = torch.Generator().manual_seed(seed)
    free = [p for p in _all_positions(layer) if p not in set(entries)]
    new = [free[i] for i in torch.randperm(len(free), generator=g)[:n_new].tolist()]
    regrown = dropped[:n_regrow]
    grown = new + regrown
    rows = torch.tensor([p[0] for p in grown], dtype=torch.long)
    cols = torch.tensor([p[1] for p in grown], dtype=torch.long)
    return keep, rows, cols, new, regrown, dropped[n_regrow:]


@pytest.mark.parametrize("kind", ["linear", "conv_groups2"])
def test_update_layer(kind):
    layer = _linear() if kind == "linear" else _conv(groups=2)
    param = layer.values
    old = _stored_dense(layer)
    old_entries = _entries(layer)
    layer.values.grad = torch.ones_like(layer.values)
    keep, rows, cols, new, regrown, gone = _update_case(layer)
    kept = [e for e, k in zip(old_entries, keep.tolist()) if k]
    stats, source = update_layer(layer, keep, rows, cols)

    pattern = set(_entries(layer))
    assert pattern == set(kept) | set(new) | set(regrown)
    assert not pattern & set(gone)
    assert layer.nnz == len(kept) + len(new) + len(regrown)
    layer.csr().validate()
    assert layer.values is param and layer.values.grad is None
    w = _stored_dense(layer)
    for p in kept + regrown:
        assert w[p] == old[p]                          # kept and dropped-and-regrown: old value
    for p in new:
        assert w[p] == 0.0                             # new: zero
    for p in gone:
        assert w[p] == 0.0
    # source maps each new entry to its old index (or -1)
    for i, p in enumerate(_entries(layer)):
        s = int(source[i])
        assert (s == -1) == (p in new)
        if s >= 0:
            assert old_entries[s] == p
    assert (stats.nnz_before, stats.nnz_after, stats.dropped, stats.grown, stats.new) == (
        len(old_entries), layer.nnz, len(old_entries) - len(kept), len(new) + len(regrown), len(new))
    # the layer computes with the new weight
    if kind == "linear":
        x = torch.randn(5, 14, dtype=torch.float64)
        torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias))
    else:
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        groups, rpg, cpg = layer.groups_layout
        wd = torch.stack([w[r, (r // rpg) * cpg:(r // rpg + 1) * cpg] for r in range(6)]).view(6, 2, 3, 3)
        torch.testing.assert_close(layer(x), F.conv2d(x, wd, layer.bias, padding=1, groups=2))
        assert torch.equal(layer.mask(), (wd != 0) | layer.mask())  # mask covers every non-zero


def test_update_layer_errors():
    layer = _linear()
    entries = _entries(layer)
    keep = drop_smallest(layer.values, 3)
    kept_pos = next(e for e, k in zip(entries, keep.tolist()) if k)
    free = next(p for p in _all_positions(layer) if p not in set(entries))
    t = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    before = (layer.values.detach().clone(), layer.col_idx.clone(), layer.row_ptr.clone())
    with pytest.raises(ValueError, match="already active"):
        update_layer(layer, keep, t(kept_pos[0]), t(kept_pos[1]))
    with pytest.raises(ValueError, match="distinct"):
        update_layer(layer, keep, t(free[0], free[0]), t(free[1], free[1]))
    with pytest.raises(ValueError, match="keep"):
        update_layer(layer, keep[1:], t(), t())
    with pytest.raises(ValueError, match="keep"):
        update_layer(layer, keep.long(), t(), t())
    with pytest.raises(ValueError, match="update_layer: keep"):
        update_layer(layer, None, t(), t())
    with pytest.raises(TypeError, match="update_layer: grow_rows must be an integer tensor"):
        update_layer(layer, keep, t(free[0]).float(), t(free[1]))
    with pytest.raises(ValueError, match="update_layer: grow_cols must be 1-D"):
        update_layer(layer, keep, t(free[0]), t(free[1]).reshape(1, 1))
    # a failed update leaves the layer untouched
    assert torch.equal(layer.values.detach(), before[0])
    assert torch.equal(layer.col_idx, before[1]) and torch.equal(layer.row_ptr, before[2])


def test_update_layer_identity_and_full_regrow():
    layer = _linear()
    old = _stored_dense(layer)
    n = layer.nnz
    stats, source = update_layer(layer, torch.ones(n, dtype=torch.bool), torch.empty(0, dtype=torch.long),
                                 torch.empty(0, dtype=torch.long))
    assert torch.equal(_stored_dense(layer), old) and torch.equal(source, torch.arange(n))
    # drop everything and regrow every old position: nothing changes either
    rows, cols = zip(*_entries(layer))
    stats, source = update_layer(layer, torch.zeros(n, dtype=torch.bool), torch.tensor(rows[::-1]),
                                 torch.tensor(cols[::-1]))
    assert torch.equal(_stored_dense(layer), old)
    assert (stats.dropped, stats.grown, stats.new) == (n, n, 0)
    layer.csr().validate()


# --------------------------------------------------------------------------- optimizer state
OPTIMIZERS = {
    "sgd_momentum": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), ["momentum_buffer"]),
    "adam": (lambda p: torch.optim.Adam(p, lr=0.01), ["exp_avg", "exp_avg_sq"]),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), ["exp_avg", "exp_avg_sq"]),
    "adam_amsgrad": (lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True), ["exp_avg", "exp_avg_sq",
                                                                            "max_exp_avg_sq"]),
}


def _train(layer, opt, steps, gen):
    for _ in range(steps):
        x = torch.randn(8, 14, generator=gen, dtype=torch.float64)
        y = torch.randn(8, 11, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        F.mse_loss(layer(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_state_remap(name):
    make, keys = OPTIMIZERS[name]
    layer = _linear()
    opt = make(layer.parameters())
    gen = torch.Generator().manual_seed(5)
    _train(layer, opt, 3, gen)
    state = opt.state[layer.values]
    old_entries = _entries(layer)
    old_state = {k: dict(zip(old_entries, state[k].tolist())) for k in keys}
    assert all(any(v != 0 for v in old_state[k].values()) for k in keys)
    old_step = state["step"].clone() if "step" in state else None
    bias_state = {k: v.clone() for k, v in opt.state[layer.bias].items()}

    keep, rows, cols, new, regrown, gone = _update_case(layer, n_drop=6, n_regrow=2, n_new=5)
    update_layer(layer, keep, rows, cols, [opt])
    state = opt.state[layer.values]
    for k in keys:
        assert state[k].shape == layer.values.shape
        for p, v in zip(_entries(layer), state[k].tolist()):
            if p in new:
                assert v == 0.0, (k, p)
            else:                                   # kept, and dropped-then-regrown
                assert v == old_state[k][p], (k, p)
    if old_step is not None:
        assert torch.equal(state["step"], old_step)
    for k, v in opt.state[layer.bias].items():   # other parameters untouched
        assert torch.equal(v, bias_state[k])
    # training goes on with the remapped state
    before = layer.values.detach().clone()
    _train(layer, opt, 2, gen)
    assert layer.values.shape == before.shape and not torch.equal(layer.values.detach(), before)
    assert torch.isfinite(layer.values).all()
    if old_step is not None:
        assert float(opt.state[layer.values]["step"]) == float(old_step) + 2


def test_optimizer_state_remap_changing_nnz():
    """Drop more than is grown (GMP-like): the state shrinks with the values."""
    layer = _linear()
    opt = torch.optim.Adam(layer.parameters(), lr=0.01)
    _train(layer, opt, 2, torch.Generator().manual_seed(0))
    old_entries = _entries(layer)
    old_avg = dict(zip(old_entries, opt.state[layer.values]["exp_avg"].tolist()))
    keep = drop_smallest(layer.values, 10)
    update_layer(layer, keep, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), [opt])
    avg = opt.state[layer.values]["exp_avg"]
    assert avg.numel() == layer.nnz == len(old_entries) - 10
    assert avg.tolist() == [old_avg[p] for p in _entries(layer)]
    _train(layer, opt, 1, torch.Generator().manual_seed(1))


# ---------------------------------------------------- update_layer: compiled merge vs torch ops
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape,density", [((37, 53), 0.3), ((64, 16), 0.0), ((9, 200), 0.9), ((1, 7), 1.0)])
def test_update_layer_compiled_merge_equals_torch_path(monkeypatch, seed, shape, density):
    """The compiled CPU merge and the torch-op path build the same pattern, values,
    source map, stats and optimizer state, on random drops and grows (regrown dropped
    positions included, grown positions in random order, empty rows)."""
    from sparsekernels import _extension
    from sparsekernels.topology import update as update_mod

    if not _extension.compiled():
        pytest.skip("needs the compiled extension")
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    mask = torch.rand(shape, generator=g) < density
    mask[out_f // 2] = False  # an empty row
    results = []
    for compiled in (True, False):
        monkeypatch.setattr(update_mod, "_merge_compiled", lambda row_ptr, c=compiled: c)
        layer = SparseLinear.from_dense(nn_linear(in_f, out_f, seed), mask=mask)
        opt = torch.optim.Adam([layer.values], lr=0.1)
        layer.values.grad = torch.randn(layer.nnz, generator=torch.Generator().manual_seed(seed))
        opt.step()
        n_drop = layer.nnz // 3
        keep = drop_smallest(layer.values, n_drop)
        entries = _entries(layer)
        dropped = [e for e, k in zip(entries, keep.tolist()) if not k]
        free = [p for p in _all_positions(layer) if p not in set(entries)]
        perm = torch.randperm(len(free), generator=torch.Generator().manual_seed(seed))
        grown = [free[i] for i in perm[:len(free) // 2].tolist()] + dropped[: len(dropped) // 2]
        order = torch.randperm(len(grown), generator=torch.Generator().manual_seed(seed + 1)).tolist()
        grown = [grown[i] for i in order]
        rows = torch.tensor([p[0] for p in grown], dtype=torch.long)
        cols = torch.tensor([p[1] for p in grown], dtype=torch.long)
        stats, source = update_layer(layer, keep, rows, cols, [opt])
        layer.csr().validate()
        results.append((stats, source, layer.csr(), opt.state[layer.values]))
    (s1, src1, c1, st1), (s2, src2, c2, st2) = results
    assert s1 == s2
    assert torch.equal(src1, src2)
    for a, b in zip((c1.values, *c1.pattern()), (c2.values, *c2.pattern())):
        assert torch.equal(a, b)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(st1[key], st2[key])


def nn_linear(in_f, out_f, seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f)


def test_update_layer_compiled_merge_rejects_positions_outside_the_weight():
    from sparsekernels import _extension

    if not _extension.compiled():
        pytest.skip("needs the compiled extension")
    layer = _linear()
    keep = torch.ones(layer.nnz, dtype=torch.bool)
    out_f, in_f = layer.csr().shape
    for r, c in ((out_f, 0), (0, in_f), (-1, 0), (0, -1)):
        with pytest.raises(ValueError, match="outside"):
            update_layer(layer, keep, torch.tensor([r]), torch.tensor([c]))
