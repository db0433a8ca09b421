"""BSR format, the bsr_mm / bsr_mm_t / bsr_sddmm ops (reference and Triton) and BSRLinear."""

import copy

import pytest
import torch
from torch import nn

import sparsekernels as sk
from sparsekernels import backends
from sparsekernels.formats import BSR

from conftest import assert_close_rel

TRITON = "triton" in backends.available("cpu")
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2}


def _bsr(out_f, in_f, b, density, dtype, g):
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64).to(dtype)
    bm = torch.rand(out_f // b, in_f // b, generator=g) < density
    return BSR.from_dense(w, bm, b), bm


def test_bsr_round_trip_and_transpose_map(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 96, generator=g)
    bm = torch.rand(4, 6, generator=g) < 0.5
    bsr = BSR.from_dense(w, bm, 16)
    mask = bm.repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert torch.equal(bsr.to_dense(), w * mask) and torch.equal(bsr.mask(), mask)
    assert torch.equal(bsr.block_mask(), bm)
    t = BSR.from_dense((w * mask).t().contiguous(), bm.t(), 16)  # W^T's BSR
    assert torch.equal(bsr.t_crow, t.crow) and torch.equal(bsr.t_ccol, t.ccol)
    assert torch.equal(bsr.values[bsr.t_perm.long()].transpose(1, 2), t.values)
    assert BSR.from_dense(w * mask, block_size=16).nnz_blocks == int(bm.sum())  # default: non-zero blocks


@pytest.mark.parametrize("bad", [dict(block_size=24), dict(block_size=0), dict(block_mask=torch.ones(2, 2))])
def test_bsr_bad_input(bad):
    with pytest.raises(ValueError):
        BSR.from_dense(torch.randn(64, 96), **{"block_size": 16, **bad})


BACKENDS = ["reference"] + (["triton"] if TRITON else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_called_directly_reject_operands_of_another_width(backend, seed):
    """torch.ops.sparsekernels.bsr_* skip the entry points' checks: an operand of another
    width raises a ValueError naming it, not a reshape error or a product of its first
    columns."""
    bsr, _ = _bsr(32, 48, 16, 0.5, torch.float32, torch.Generator().manual_seed(seed))
    p = bsr.pattern()
    cases = [("x", lambda w: torch.ops.sparsekernels.bsr_mm(torch.randn(4, w), bsr.values, *p), 48),
             ("dy", lambda w: torch.ops.sparsekernels.bsr_mm_t(torch.randn(4, w), bsr.values, *p), 32),
             ("x", lambda w: torch.ops.sparsekernels.bsr_sddmm(torch.randn(4, 32), torch.randn(4, w), *p, bsr.values),
              48),
             ("dy", lambda w: torch.ops.sparsekernels.bsr_sddmm(torch.randn(4, w), torch.randn(4, 48), *p, bsr.values),
              32)]
    with sk.use_backend(backend):
        for name, call, width in cases:
            for wrong in (width + 16, width - 16, width + 1):
                with pytest.raises(ValueError, match=rf"{name} must have shape \[\.\.\., {width}\]"):
                    call(wrong)
        with pytest.raises(ValueError, match="same leading dimensions"):
            torch.ops.sparsekernels.bsr_sddmm(torch.randn(4, 32), torch.randn(3, 48), *p, bsr.values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_called_directly_check_values_against_the_pattern(backend, seed):
    """A direct call with fewer (or more) blocks of values than the pattern, values of
    another dtype than x, or a pattern index of the wrong dtype: a ValueError / TypeError
    naming it (values one block short had been read past their end: a segfault under
    Triton's interpreter)."""
    bsr, _ = _bsr(32, 48, 16, 0.5, torch.float32, torch.Generator().manual_seed(seed))
    p = bsr.pattern()
    x, dy = torch.randn(3, 48), torch.randn(3, 32)
    ops = torch.ops.sparsekernels
    with sk.use_backend(backend):
        for values in (bsr.values[:1], bsr.values[:-1], torch.cat([bsr.values, bsr.values[:1]])):
            for call in (lambda v: ops.bsr_mm(x, v, *p), lambda v: ops.bsr_mm_t(dy, v, *p),
                         lambda v: ops.bsr_sddmm(dy, x, *p, v)):
                with pytest.raises(ValueError, match="ccol must have nnz"):
                    call(values)
        with pytest.raises(TypeError, match="x has dtype torch.float64 but the weight values have torch.float32"):
            ops.bsr_mm(x.double(), bsr.values, *p)
        with pytest.raises(TypeError, match="crow must be int32"):
            ops.bsr_mm(x, bsr.values, p[0].long(), *p[1:])
        with pytest.raises(ValueError, match=r"values must be \[nb, b, b\]"):
            ops.bsr_mm(x, bsr.values.reshape(bsr.values.shape[0], -1), *p)


@pytest.mark.parametrize("b", [1, 3, 8, 48])
def test_block_sizes_the_triton_kernels_do_not_take_run_on_the_reference(b, seed):
    """Triton's tiles are powers of two of at least 16 (BLOCK_SIZES): other block sizes run
    on the reference, also where Triton is asked for, with the same results."""
    g = torch.Generator().manual_seed(seed)
    bsr, _ = _bsr(2 * b, 3 * b, b, 0.7, torch.float32, g)
    x = torch.randn(5, 3 * b, generator=g)
    with sk.use_backend("triton" if TRITON else "reference"):
        y = sk.ops.bsr_mm(x, bsr.values, *bsr.pattern())
    torch.testing.assert_close(y, x @ bsr.to_dense().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("b,density,batch", [(16, 0.5, 5), (16, 1.0, 1), (32, 0.3, 17), (16, 0.0, 3)])
def test_bsr_ops_match_dense(backend, dtype, b, density, batch, seed):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton's tl.dot has no fp64 path")
    if backend == "reference" and dtype == torch.float16:
        pytest.skip("CPU half einsum is not the point of the reference")
    g = torch.Generator().manual_seed(seed)
    bsr, bm = _bsr(3 * b, 2 * b, b, density, dtype, g)
    x = torch.randn(batch, 2 * b, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(batch, 3 * b, generator=g, dtype=torch.float64).to(dtype)
    wd, xd, dyd = bsr.to_dense().double(), x.double(), dy.double()
    with sk.use_backend(backend):
        y = sk.ops.bsr_mm(x, bsr.values, *bsr.pattern())
        dx = sk.ops.bsr_mm_t(dy, bsr.values, *bsr.pattern())
        dv = sk.ops.bsr_sddmm(dy, x, bsr.values, *bsr.pattern())
    full = dyd.t() @ xd
    expected_dv = full.reshape(3, b, 2, b).transpose(1, 2)[bm]
    assert_close_rel(y, xd @ wd.t(), TOL[dtype], "bsr_mm")
    assert_close_rel(dx, dyd @ wd, TOL[dtype], "bsr_mm_t")
    assert_close_rel(dv, expected_dv, TOL[dtype], "bsr_sddmm")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bsr_gradcheck_and_opcheck(backend, seed):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if backend == "reference" else torch.float32
    bsr, _ = _bsr(32, 48, 16, 0.6, dtype, g)
    x = torch.randn(3, 48, generator=g, dtype=dtype, requires_grad=True)
    v = bsr.values.clone().requires_grad_(True)
    with sk.use_backend(backend):
        if dtype == torch.float64:
            assert torch.autograd.gradcheck(lambda x, v: sk.ops.bsr_mm(x, v, *bsr.pattern()), (x, v))
            assert torch.autograd.gradgradcheck(lambda x, v: sk.ops.bsr_mm(x, v, *bsr.pattern()), (x, v))
            torch.library.opcheck(torch.ops.sparsekernels.bsr_mm, (x, v, *bsr.pattern()))
        else:  # Triton: compare the autograd gradients with the dense ones
            sk.ops.bsr_mm(x, v, *bsr.pattern()).square().sum().backward()
            wd = bsr.to_dense().clone().requires_grad_(True)
            xd = x.detach().clone().requires_grad_(True)
            (xd @ wd.t()).square().sum().backward()
            assert_close_rel(x.grad, xd.grad, 1e-5, "x grad")
            assert_close_rel(v.grad, wd.grad.reshape(2, 16, 3, 16).transpose(1, 2)[bsr.block_mask()], 1e-5, "v grad")


def test_sparse_linear_bsr_format_trains_and_round_trips(seed):
    torch.manual_seed(seed)
    layer = sk.SparseLinear(64, 32, sparsity=0.75, format="bsr", block_size=16)
    assert isinstance(layer, sk.nn.BSRLinear) and layer.values.shape == (2, 16, 16)
    assert layer.sparsity == pytest.approx(0.75)
    x = torch.randn(7, 64)
    dense = layer.to_dense()
    assert_close_rel(layer(x), dense(x), 1e-5, "forward")
    again = sk.nn.BSRLinear.from_dense(dense, block_mask=layer.block_mask(), block_size=16)
    assert torch.equal(again.values, layer.values)
    copy_ = sk.SparseLinear(64, 32, sparsity=0.5, format="bsr", block_size=16)
    copy_.load_state_dict(layer.state_dict())
    assert torch.equal(copy_(x), layer(x))
    assert type(copy.deepcopy(layer)) is sk.nn.BSRLinear
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    target = torch.randn(7, 32)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_bsr_linear_from_dense_keeps_largest_blocks_and_rejects_bad_input():
    lin = nn.Linear(32, 32)
    with torch.no_grad():
        lin.weight.mul_(0.01)
        lin.weight[:16, 16:] = 5.0
    layer = sk.nn.BSRLinear.from_dense(lin, sparsity=0.75, block_size=16)
    assert torch.equal(layer.block_mask(), torch.tensor([[False, True], [False, False]]))
    with pytest.raises(ValueError):
        sk.SparseLinear(30, 32, format="bsr", block_size=16)
    with pytest.raises(ValueError):
        sk.SparseLinear(32, 32, format="coo")
    with pytest.raises(ValueError):
        layer(torch.randn(2, 31))
    with pytest.raises(TypeError):
        layer(torch.randn(2, 32, dtype=torch.float64))
