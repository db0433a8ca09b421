"""prune_to / grow_to_dense: the dense-phase primitives (GMP, AC/DC, GaP)."""

import pytest
import torch

import sparsekernels as sk
from sparsekernels.topology import grow_to_dense, prune_to


def test_grow_to_dense_then_prune_to_round_trip(seed):
    torch.manual_seed(seed)
    layer = sk.SparseConv2d(4, 6, 3, groups=2, sparsity=0.7, dtype=torch.float64)
    opt = torch.optim.Adam(layer.parameters())
    layer(torch.randn(2, 4, 5, 5, dtype=torch.float64)).square().sum().backward()
    opt.step()
    before = layer.dense_weight().clone()
    exp_avg_before = dict(zip(map(tuple, layer.mask().nonzero().tolist()), opt.state[layer.values]["exp_avg"].tolist()))
    stats = grow_to_dense(layer, [opt])
    assert layer.nnz == 6 * 2 * 9 and stats.new == 6 * 2 * 9 - stats.nnz_before
    assert torch.equal(layer.dense_weight(), before)          # grown entries are exactly zero
    state = dict(zip(map(tuple, layer.mask().nonzero().tolist()), opt.state[layer.values]["exp_avg"].tolist()))
    for pos, value in state.items():
        assert value == exp_avg_before.get(pos, 0.0)           # kept keep their state, new start at zero
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.to_dense()(x))
    k = 20
    prune_to(layer, k, [opt])
    w = layer.dense_weight()
    assert layer.nnz == k
    kept = before.abs().flatten().sort(descending=True, stable=True).values[:k]
    torch.testing.assert_close(w.abs().flatten().sort(descending=True).values[:k], kept)
    layer.csr().validate()
    with pytest.raises(ValueError):
        prune_to(layer, k + 1)
