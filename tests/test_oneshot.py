"""One-shot pruning (sparsekernels.oneshot): each solver against an independent plain
implementation written here (brute-force OBS, SparseGPT with explicit inverses, the
explicit inverse Fisher), the error / accuracy ordering OBC <= SparseGPT <= magnitude,
real sparse layers out, the memory of SparseGPT, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekernels.formats import is_24
from sparsekernels.nn import Sparse24Linear, SparseConv2d, SparseLinear
from sparsekernels.oneshot import (WoodburyFisherInverse, collect_hessian, magnitude_prune, obc_prune, prune,
                                   sparsegpt_peak_memory, sparsegpt_prune)

D64 = torch.float64


def ar1_inputs(n: int, k: int, rho: float = 0.9, *, seed: int = 0) -> torch.Tensor:
    """[n, k] inputs with correlation rho^|i-j| between features (neighbouring inputs
    strongly correlated, as neighbouring pixels or channels are)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(k)
    C = rho ** (idx[:, None] - idx[None, :]).abs().to(D64)
    return torch.randn(n, k, generator=g, dtype=D64) @ torch.linalg.cholesky(C).T


def hessian(X: torch.Tensor) -> torch.Tensor:
    return 2 / X.shape[0] * X.T @ X


def dampened(H: torch.Tensor, damp: float) -> torch.Tensor:
    return H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)


# --------------------------------------------------------------------------- OBC
def brute_force_obs(W, Hd, sparsity, nm=None):
    """Greedy OBS from scratch: each step tries every remaining weight, solving the
    constrained least squares min (w-v)^T Hd (w-v) s.t. v_P = 0 anew (no downdates); per-row
    counts by a global sort of the loss increments (unstructured), as OBC."""
    rows, k = W.shape

    def solve(w, removed):
        keep = [i for i in range(k) if i not in removed]
        v = torch.zeros_like(w)
        if keep:
            K = torch.tensor(keep)
            v[K] = torch.linalg.solve(Hd[K][:, K], Hd[K] @ w)
        return v, float((w - v) @ Hd @ (w - v)) / 2

    orders, incs = [], []
    steps = k if nm is None else k // nm[1] * (nm[1] - nm[0])
    for r in range(rows):
        w, removed, loss, inc = W[r], [], 0.0, []
        for _ in range(steps):
            best = None
            for q in range(k):
                if q in removed:
                    continue
                if nm is not None and sum(1 for p in removed if p // nm[1] == q // nm[1]) >= nm[1] - nm[0]:
                    continue
                _, l_q = solve(w, removed + [q])
                if best is None or l_q < best[1]:
                    best = (q, l_q)
            removed.append(best[0])
            inc.append(best[1] - loss)
            loss = best[1]
        orders.append(removed)
        incs.append(inc)
    if nm is None:
        flat = torch.tensor([v for row in incs for v in row], dtype=D64)
        chosen = torch.sort(flat, stable=True).indices[: int(round(sparsity * rows * k))]
        counts = [int(((chosen // k) == r).sum()) for r in range(rows)]
    else:
        counts = [steps] * rows
    out = torch.zeros_like(W)
    kept = torch.ones(rows, k, dtype=torch.bool)
    for r in range(rows):
        P = orders[r][: counts[r]]
        out[r] = solve(W[r], P)[0]
        kept[r, P] = False
    return out, kept


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.75, None), (0.5, (2, 4))])
def test_obc_equals_brute_force_obs(sparsity, nm):
    X = ar1_inputs(64, 8, seed=1)
    W = torch.randn(5, 8, generator=torch.Generator().manual_seed(2), dtype=D64)
    H = hessian(X)
    got, kept = obc_prune(W, H, sparsity, nm, damp=0.01)
    want, want_kept = brute_force_obs(W, dampened(H, 0.01), sparsity, nm)
    assert torch.equal(kept, want_kept)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.all(got[~kept] == 0)
    assert int((~kept).sum()) == round(sparsity * W.numel())


def test_obc_refuses_wide_layers():
    with pytest.raises(ValueError, match="max_columns"):
        obc_prune(torch.randn(2, 40), torch.eye(40), 0.5, max_columns=32)


# --------------------------------------------------------------------------- SparseGPT
def sparsegpt_explicit(W, Hd, sparsity, nm, block):
    """SparseGPT with explicit inverses of the trailing Hessians H[j:, j:] (no Cholesky
    trick, no lazy batching): column j is fixed, its error spread over columns j.. by the
    OBS update with (H[j:, j:])^-1; masks chosen per block of ``block`` columns from the
    weights at the block's start (N:M: per group at the group's first column)."""
    W = W.clone()
    rows, k = W.shape
    inv = [torch.linalg.inv(Hd[j:, j:]) for j in range(k)]
    d = torch.tensor([inv[j][0, 0] for j in range(k)], dtype=D64)
    pruned = torch.zeros(rows, k, dtype=torch.bool)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        if nm is None:
            score = (W[:, b0:b1] ** 2 / d[b0:b1]).reshape(-1)
            count = int(score.numel() * sparsity)
            blk = torch.zeros(score.numel(), dtype=torch.bool)
            blk[torch.sort(score, stable=True).indices[:count]] = True
            pruned[:, b0:b1] = blk.view(rows, b1 - b0)
        for j in range(b0, b1):
            if nm is not None and (j - b0) % nm[1] == 0:
                s = W[:, j:j + nm[1]] ** 2 / d[j:j + nm[1]]
                low = torch.topk(s, nm[1] - nm[0], dim=1, largest=False).indices
                pruned[:, j:j + nm[1]] = torch.zeros_like(s, dtype=torch.bool).scatter_(1, low, True)
            q = W[:, j].masked_fill(pruned[:, j], 0)
            W[:, j:] -= ((W[:, j] - q) / inv[j][0, 0])[:, None] * inv[j][0][None, :]
            W[:, j] = q
    return W, ~pruned


@pytest.mark.parametrize("sparsity,nm", [(0.6, None), (0.5, (2, 4)), (0.5, (1, 2))])
def test_sparsegpt_matches_explicit_algorithm(sparsity, nm):
    X = ar1_inputs(128, 40, seed=3)
    W = torch.randn(6, 40, generator=torch.Generator().manual_seed(4), dtype=D64)
    H = hessian(X)
    got, kept = sparsegpt_prune(W, H, sparsity, nm, damp=0.01, block_size=16)  # 3 blocks: lazy updates
    want, want_kept = sparsegpt_explicit(W, dampened(H, 0.01), sparsity, nm, 16)
    assert torch.equal(kept, want_kept)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    if nm is not None:
        assert torch.all(kept.reshape(6, -1, nm[1]).sum(-1) == nm[0])


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_reconstruction_error_orders_obc_sparsegpt_magnitude(sparsity):
    X = ar1_inputs(512, 64, seed=5)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(6), dtype=D64)
    H = hessian(X)

    def err(w_hat):
        return float(((W - w_hat) @ X.T).pow(2).sum())

    e_obc = err(obc_prune(W, H, sparsity)[0])
    e_gpt = err(sparsegpt_prune(W, H, sparsity)[0])
    e_mag = err(magnitude_prune(W, sparsity)[0])
    assert e_obc < e_gpt < e_mag, (e_obc, e_gpt, e_mag)


def test_sparsegpt_peak_memory_is_quadratic_in_k():
    # SparseGPT keeps H, its inverse factor and W (rows = k): a few k^2 floats, never the
    # rows x k x k of per-row inverses. Measured from torch's allocation records.
    small, large = sparsegpt_peak_memory(256), sparsegpt_peak_memory(512)
    for r in (small, large):
        assert 0 < r["per_k2"] < 8, r
    assert large["peak_bytes"] / small["peak_bytes"] < 4.5   # quadratic growth, not worse


# --------------------------------------------------------------------------- calibration
def test_collect_hessian_linear_and_grouped_conv():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    x = torch.randn(4, 5, 6)
    H, n = collect_hessian(lin, lin, [x[:2], x[2:]])
    flat = x.reshape(-1, 6)
    assert n == 20
    torch.testing.assert_close(H[0], 2 / 20 * flat.T @ flat, rtol=1e-5, atol=1e-6)

    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2)
    xc = torch.randn(3, 4, 7, 7)
    H, n = collect_hessian(conv, conv, [xc])
    cols = F.unfold(xc, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 36)   # [N*L, C*3*3]
    assert n == cols.shape[0] and H.shape == (2, 18, 18)
    for g in range(2):
        c = cols[:, g * 18:(g + 1) * 18]
        torch.testing.assert_close(H[g], 2 / n * c.T @ c, rtol=1e-5, atol=1e-6)


def test_layers_calibrated_on_inputs_through_pruned_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    data = [torch.randn(32, 8) for _ in range(3)]
    ref = copy.deepcopy(model)
    prune(model, data, method="sparsegpt", sparsity=0.5, progress=False)
    # Layer 1 pruned by hand, then layer 2's Hessian from the PRUNED layer 1's outputs.
    H1, _ = collect_hessian(ref, ref[0], data)
    w1, k1 = sparsegpt_prune(ref[0].weight.detach(), H1[0], 0.5)
    torch.testing.assert_close(model[0].to_dense().weight, w1 * k1)
    with torch.no_grad():
        ref[0].weight.copy_(w1)
    H2, _ = collect_hessian(ref, ref[2], data)
    w2, k2 = sparsegpt_prune(ref[2].weight.detach(), H2[0], 0.5)
    torch.testing.assert_close(model[2].to_dense().weight, w2 * k2, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- digits MLP
@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(25):
        for i in range(0, 1400, 64):
            idx = tr[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    calib = [(X[tr[i:i + 128]], y[tr[i:i + 128]]) for i in range(0, 1024, 128)]
    return model, calib, X[te], y[te], X[tr], y[tr]


def accuracy(model, X, y):
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


@pytest.mark.parametrize("sparsity", [0.7, 0.8, 0.9])
def test_digits_accuracy_orders_obc_sparsegpt_magnitude(digits, sparsity):
    model, calib, Xte, yte, _, _ = digits
    acc = {}
    for method in ("magnitude", "sparsegpt", "obc"):
        pruned = prune(model, calib, method=method, sparsity=sparsity, inplace=False, progress=False)
        layers = [m for m in pruned.modules() if isinstance(m, SparseLinear)]
        assert len(layers) == 3
        for m in layers:
            assert abs(m.sparsity - sparsity) < 0.01
        acc[method] = accuracy(pruned, Xte, yte)
    assert acc["obc"] > acc["sparsegpt"] > acc["magnitude"], acc
    assert all(isinstance(m, nn.Linear) for m in model if not isinstance(m, nn.ReLU))   # inplace=False


def test_digits_mfac_beats_magnitude(digits):
    model, _, Xte, yte, Xtr, ytr = digits
    loader = [(Xtr[i:i + 16], ytr[i:i + 16]) for i in range(0, 1024, 16)]       # 64 gradients
    pruned = prune(model, loader, method="mfac", sparsity=0.8, loss_fn=F.cross_entropy, inplace=False,
                   progress=False)
    mag = prune(model, None, method="magnitude", sparsity=0.8, inplace=False, progress=False)
    assert all(abs(m.sparsity - 0.8) < 0.01 for m in pruned.modules() if isinstance(m, SparseLinear))
    assert accuracy(pruned, Xte, yte) > accuracy(mag, Xte, yte) + 0.05


def test_sparsegpt_24_gives_valid_24_layers(digits):
    model, calib, Xte, yte, _, _ = digits
    pruned = prune(model, calib, method="sparsegpt", pattern="2:4", inplace=False, progress=False)
    layers = [m for m in pruned.modules() if isinstance(m, Sparse24Linear)]
    assert len(layers) == 3
    for m in layers:
        assert is_24(m.mask())
    mag = prune(model, calib, method="magnitude", pattern="2:4", inplace=False, progress=False)
    assert accuracy(pruned, Xte, yte) > accuracy(mag, Xte, yte)
    # 1:4 is N:M too: CSR layers with exactly one weight of every 4.
    p14 = prune(model, calib, method="sparsegpt", pattern="1:4", inplace=False, progress=False)
    for m in p14.modules():
        if isinstance(m, SparseLinear):
            assert torch.all(m.mask().reshape(m.out_features, -1, 4).sum(-1) == 1)


# --------------------------------------------------------------------------- M-FAC
@pytest.mark.parametrize("block_size", [None, 7])
def test_woodbury_fisher_inverse_matches_explicit(block_size):
    g = torch.Generator().manual_seed(7)
    grads = torch.randn(6, 30, generator=g, dtype=D64)
    finv = WoodburyFisherInverse(grads, damp=0.1, block_size=block_size)
    B = 30 if block_size is None else block_size
    F_ = torch.zeros(30, 30, dtype=D64)
    for b0 in range(0, 30, B):                     # block-diagonal empirical Fisher, inverted directly
        s = slice(b0, min(b0 + B, 30))
        F_[s, s] = 0.1 * torch.eye(s.stop - s.start, dtype=D64) + grads[:, s].T @ grads[:, s] / 6
    inv = torch.linalg.inv(F_)
    x = torch.randn(30, generator=g, dtype=D64)
    torch.testing.assert_close(finv.diag(), inv.diagonal(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(finv.mul(x), inv @ x, rtol=1e-9, atol=1e-9)


def test_mfac_one_step_matches_explicit_obs_with_dense_fisher():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False)).double()
    data = [(torch.randn(8, 6, dtype=D64), torch.randint(0, 3, (8,))) for _ in range(5)]
    ref = copy.deepcopy(model)
    pruned = prune(model, data, method="mfac", sparsity=0.5, loss_fn=F.cross_entropy, num_grads=5,
                   fisher_block_size=None, fisher_damp=1e-2, recomputations=1, progress=False)
    # Explicit: the 5 gradients, F = damp I + G^T G / m inverted directly, per-layer lowest
    # w^2 / (2 [F^-1]_jj) dropped, w += F^-1 (-w_Q / [F^-1]_QQ), w_Q = 0.
    params = [ref[0].weight, ref[2].weight]
    G = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(ref(x), y), params)])
                     for x, y in data])
    Finv = torch.linalg.inv(1e-2 * torch.eye(G.shape[1], dtype=D64) + G.T @ G / 5)
    w = torch.cat([p.detach().reshape(-1) for p in params])
    score = w ** 2 / (2 * Finv.diagonal())
    drop = torch.zeros_like(w, dtype=torch.bool)
    for lo, hi in ((0, 30), (30, 45)):
        drop[lo + torch.sort(score[lo:hi], stable=True).indices[: (hi - lo) // 2]] = True
    delta = torch.where(drop, -w / Finv.diagonal(), torch.zeros_like(w))
    want = w + Finv @ delta
    want[drop] = 0
    got = torch.cat([pruned[0].to_dense().weight.reshape(-1), pruned[2].to_dense().weight.reshape(-1)])
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- conv
def test_sparsegpt_on_cnn_gives_sparse_conv_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    data = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    pruned = prune(model, data, method="sparsegpt", sparsity=0.6, inplace=False, progress=False)
    convs = [m for m in pruned.modules() if isinstance(m, SparseConv2d)]
    assert len(convs) == 2 and all(abs(c.sparsity - 0.6) < 0.05 for c in convs)
    dense = copy.deepcopy(pruned)
    for i in (0, 2):
        dense[i] = pruned[i].to_dense()
    dense[5] = pruned[5].to_dense()
    with torch.no_grad():
        torch.testing.assert_close(pruned(data[0]), dense(data[0]), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- bad input
def test_bad_input():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    data = [torch.randn(4, 6)]
    with pytest.raises(ValueError, match="no batches"):
        prune(model, [], method="sparsegpt")
    with pytest.raises(ValueError, match="no batches"):
        prune(model, iter([]), method="obc")
    for damp in (0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="damp"):
            prune(model, data, damp=damp)
    with pytest.raises(ValueError, match="divisible by 4"):
        prune(model, data, pattern="2:4")          # first layer: in_features 6
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)   # untouched
    for s in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            prune(model, data, sparsity=s)
    with pytest.raises(TypeError, match="sparsity"):
        prune(model, data, sparsity="half")
    with pytest.raises(ValueError, match="disagrees"):
        prune(model, data, sparsity=0.7, pattern="2:4")
    for pattern in ("4:2", "0:4", "2-4", (2, 2)):
        with pytest.raises(ValueError, match="pattern"):
            prune(model, data, pattern=pattern)
    with pytest.raises(ValueError, match="method"):
        prune(model, data, method="optimal")
    with pytest.raises(TypeError, match="loss_fn"):
        prune(model, data, method="mfac")
    with pytest.raises(TypeError, match="targets"):
        prune(model, data, method="mfac", loss_fn=F.mse_loss)
    with pytest.raises(ValueError, match="max_columns"):
        prune(model, data, method="obc", max_columns=4)
    with pytest.raises(TypeError, match="loader"):
        prune(model, torch.randn(4, 6))
    with pytest.raises(TypeError, match="model"):
        prune("model", data)
    with pytest.raises(TypeError, match="loader"):
        prune(model, None, method="sparsegpt")


def test_solvers_bad_input():
    W, H = torch.randn(4, 8), torch.eye(8)
    for solver in (sparsegpt_prune, obc_prune):
        with pytest.raises(ValueError, match="H must be"):
            solver(W, torch.eye(6), 0.5)
        with pytest.raises(ValueError, match="W must be"):
            solver(torch.randn(8), H, 0.5)
        with pytest.raises(ValueError, match="damp"):
            solver(W, H, 0.5, damp=0.0)
        with pytest.raises(ValueError, match="sparsity"):
            solver(W, H, 1.0)
        with pytest.raises(ValueError, match="divisible by 3"):
            solver(W, H, 0.5, (1, 3))
