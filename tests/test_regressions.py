"""Regression tests for bugs found in review (each asserts the correct behaviour)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsekernels as sk
from sparsekernels.formats import BSR, CSR
from sparsekernels.methods import GMP, RigL
from sparsekernels.nn import BSRLinear, Sparse24Linear, SparseLinear, densify, sparsify
from sparsekernels.ops import bsr_mm, sparse24_mm, spmm, spmm_t
from sparsekernels.topology.update import prune_to


# --------------------------------------------------------------------------- 1. stale AccumulateGrad
def test_nnz_changing_update_breaks_backward_while_previous_graph_alive():
    """set_csr() resizes ``values`` through ``.data``; autograd's cached AccumulateGrad
    node (alive while any earlier graph is referenced, e.g. the usual ``loss = ...`` loop
    variable) keeps the old shape, so the next backward raises."""
    torch.manual_seed(0)
    layer = SparseLinear(10, 3, sparsity=0.0)
    x = torch.randn(4, 10)
    loss = layer(x).sum()
    loss.backward()
    prune_to(layer, 21)                       # nnz 30 -> 21
    loss = layer(x).sum()                     # old graph still referenced until here
    loss.backward()
    assert layer.values.grad.shape == (21,)


def test_gmp_training_loop_crashes_after_first_prune():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    gmp = GMP(model, opt, sparsity=0.9, end_step=6, update_interval=3)
    for _ in range(6):
        loss = model(torch.randn(4, 10)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert len(gmp.history) == 2


def test_load_state_dict_with_other_nnz_leaves_stale_grad():
    torch.manual_seed(0)
    a, b = SparseLinear(10, 3, sparsity=0.5), SparseLinear(10, 3, sparsity=0.0)
    x = torch.randn(4, 10)
    b(x).sum().backward()                     # b.values.grad has 30 entries
    b.load_state_dict(a.state_dict())         # b now holds 15
    b(x).sum().backward()
    assert b.values.grad.shape == b.values.shape


# --------------------------------------------------------------------------- 2. corrupt patterns
def _dense_csr():
    w = torch.randn(4, 4)
    return CSR.from_dense(w, torch.ones(4, 4, dtype=torch.bool))


def test_auto_backend_silently_accepts_negative_col_idx():
    """A -1 column must be an error on every path (the reference path once checked
    nothing: it wrapped into the previous row, a silent wrong answer)."""
    c = _dense_csr()
    col = c.col_idx.clone()
    col[5] = -1
    with pytest.raises(ValueError):
        spmm(torch.randn(2, 4), c.values, c.row_ptr, col, c.t_row_ptr, c.t_col_idx, c.t_perm)


def test_auto_backend_silently_accepts_out_of_range_col_idx():
    c = _dense_csr()
    col = c.col_idx.clone()
    col[1] = 7                                # row 0, column 7 -> lands in row 1
    with pytest.raises(ValueError):
        spmm(torch.randn(2, 4), c.values, c.row_ptr, col, c.t_row_ptr, c.t_col_idx, c.t_perm)


def test_reference_backend_decreasing_row_ptr_is_not_a_value_error():
    c = _dense_csr()
    rp = c.row_ptr.clone()
    rp[2] = 20
    with pytest.raises(ValueError):
        spmm(torch.randn(2, 4), c.values, rp, c.col_idx, c.t_row_ptr, c.t_col_idx, c.t_perm)


def test_bsr_mm_silently_accepts_negative_ccol():
    b = BSR.from_dense(torch.randn(8, 12), torch.tensor([[1, 0, 1], [0, 1, 1]]).bool(), 4)
    ccol = b.ccol.clone()
    ccol[0] = -1
    with pytest.raises(ValueError):
        bsr_mm(torch.randn(3, 12), b.values, b.crow, ccol, b.t_crow, b.t_ccol, b.t_perm)


def test_sparse24_mm_reference_silently_accepts_corrupt_meta():
    layer = Sparse24Linear(8, 4)
    meta = layer.meta.clone()
    meta[0, 0] = 0                            # i0 == i1 == 0: invalid (the CPU kernel rejects it)
    with sk.use_backend("reference"), pytest.raises(ValueError):
        sparse24_mm(torch.randn(3, 8), layer.values.detach(), meta, layer.row_ptr, layer.col_idx,
                    layer.t_row_ptr, layer.t_col_idx, layer.t_perm)


# --------------------------------------------------------------------------- 3. Triton strides
def test_triton_spmm_ignores_values_stride():
    pytest.importorskip("triton")
    if "triton" not in sk.backends.available("cpu") and not torch.cuda.is_available():
        pytest.skip("triton interpreter not active")
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    c = CSR.from_dense(w, torch.rand(6, 8) < 0.5)
    vals = torch.randn(c.nnz, 2)[:, 0]        # non-contiguous 1-D values
    x, dy = torch.randn(3, 8), torch.randn(3, 6)
    dense = CSR(vals, *c.pattern(), c.shape).to_dense()
    with sk.use_backend("triton"):
        y = spmm(x, vals, *c.pattern())
        dx = spmm_t(dy, vals, *c.pattern())
    torch.testing.assert_close(y, x @ dense.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dy @ dense, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- 4. BSR empty batch
@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64)])
def test_bsr_linear_empty_batch(shape):
    layer = BSRLinear(64, 64, block_size=32, sparsity=0.5)
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape[:-1], 64)
    y.sum().backward()


# --------------------------------------------------------------------------- 5. Sparse24Linear state
@pytest.mark.parametrize("mode", ["fixed", "srste"])
def test_sparse24_linear_mask_stale_after_load_state_dict(mode):
    torch.manual_seed(0)
    a = Sparse24Linear(8, 4, mode=mode)
    b = Sparse24Linear(8, 4, mode=mode)
    assert not torch.equal(a.mask(), b.mask())
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.mask(), a.mask())
    assert torch.equal(b.dense_weight(), a.dense_weight())


# --------------------------------------------------------------------------- 6. GMP final sparsity
def test_gmp_never_reaches_final_sparsity_off_grid_end_step():
    """end_step - start_step not a multiple of update_interval (also the default
    end_step = 0.75 * total_steps): the last update runs before end_step at a lower s_t."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 20))
    opt = torch.optim.SGD(model.parameters(), 1e-2)
    gmp = GMP(model, opt, sparsity=0.9, end_step=10, update_interval=7)
    for _ in range(15):
        opt.zero_grad()
        model(torch.randn(4, 20)).square().mean().backward()
        opt.step()
    for name, layer in gmp.layers.items():
        assert layer.sparsity == pytest.approx(0.9), name


# --------------------------------------------------------------------------- 7. densify
@pytest.mark.parametrize("fmt", ["2:4", "bsr"])
def test_densify_does_not_undo_structured_sparsify(fmt):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    x = torch.randn(3, 64)
    sparse = sparsify(model, 0.5, format=fmt)
    y = sparse(x)
    dense = densify(sparse)
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in dense)
    torch.testing.assert_close(dense(x), y)


# --------------------------------------------------------------------------- 8. RigL partial update
def test_rigl_update_with_unused_layer_is_not_atomic():
    """A layer without a forward on the update step makes RigL raise from inside
    optimizer.step() AFTER the other layers were already re-wired: masks changed, no
    history record. Either skip that layer or fail before mutating anything."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(10, 8), nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    m = M()
    opt = torch.optim.SGD(m.parameters(), 1e-2)
    rigl = RigL(m, opt, sparsity=0.5, update_interval=2, total_steps=10, distribution="uniform")
    unused_before = rigl.masks()["unused"].clone()
    for step in range(2):
        opt.zero_grad()
        m(torch.randn(4, 10)).square().mean().backward()
        if step == 1:  # the update step: the unused layer is skipped, with a warning
            with pytest.warns(UserWarning, match="no forward"):
                opt.step()
        else:
            opt.step()
    assert len(rigl.history) == 1
    record = rigl.history[0]["layers"]
    assert "skipped" in record["unused"] and record["unused"]["dropped"] == 0
    assert torch.equal(rigl.masks()["unused"], unused_before)
    assert record["a"]["dropped"] > 0 and "skipped" not in record["a"]
