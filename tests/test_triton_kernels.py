"""Triton CSR kernels against the dense computation. On a machine without a GPU they run
in Triton's interpreter (TRITON_INTERPRET=1, set by conftest): small shapes, fp32 / fp16 /
fp64 (bf16 is not exact in the interpreter)."""

import pytest
import torch

import sparsekernels as sk
from sparsekernels import backends

from conftest import assert_close_rel

pytestmark = pytest.mark.skipif("triton" not in backends.available("cpu"),
                                reason="Triton interpreter not usable here (needs triton and TRITON_INTERPRET=1)")

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2}
SHAPES = [(1, 7, 5), (5, 19, 23), (33, 17, 6)]  # (batch, in, out): batch 1 and odd sizes


def _weight(out_f, in_f, sparsity, dtype, g, empty_rows=False):
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    mask = torch.rand(out_f, in_f, generator=g) >= sparsity
    if empty_rows:
        mask[::3] = False
        mask[:, ::4] = False
    return (w * mask).to(dtype), mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 1.0])
def test_triton_ops_match_dense(dtype, shape, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    b, in_f, out_f = shape
    w, mask = _weight(out_f, in_f, sparsity, dtype, g, empty_rows=sparsity == 0.7)
    csr = sk.CSR.from_dense(w, mask)
    x = torch.randn(b, in_f, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(b, out_f, generator=g, dtype=torch.float64).to(dtype)
    wd, xd, dyd = w.double(), x.double(), dy.double()
    with sk.use_backend("triton"):
        y = sk.ops.spmm(x, csr.values, *csr.pattern())
        dx = sk.ops.spmm_t(dy, csr.values, *csr.pattern())
        dv = sk.ops.sddmm(dy, x, *csr.pattern())
    assert y.dtype == dx.dtype == dv.dtype == dtype
    assert_close_rel(y, xd @ wd.t(), TOL[dtype], "triton spmm")
    assert_close_rel(dx, dyd @ wd, TOL[dtype], "triton spmm_t")
    assert_close_rel(dv, (dyd.t() @ xd)[mask], TOL[dtype], "triton sddmm")


def test_triton_batched_noncontiguous_input(seed):
    g = torch.Generator().manual_seed(seed)
    w, mask = _weight(6, 9, 0.5, torch.float32, g)
    csr = sk.CSR.from_dense(w, mask)
    x = torch.randn(9, 2, 3, generator=g).permute(1, 2, 0)  # [2, 3, 9], non-contiguous
    with sk.use_backend("triton"):
        y = sk.ops.spmm(x, csr.values, *csr.pattern())
    assert y.shape == (2, 3, 6)
    assert_close_rel(y, x.double() @ w.double().t(), 1e-5, "triton spmm 3-D")


def test_triton_layer_forward_backward(seed):
    torch.manual_seed(seed)
    layer = sk.SparseLinear(11, 7, sparsity=0.6, dtype=torch.float64)
    dense = layer.to_dense()
    x = torch.randn(4, 11, dtype=torch.float64, requires_grad=True)
    xd = x.detach().clone().requires_grad_(True)
    with sk.use_backend("triton"):
        layer(x).pow(2).sum().backward()
    dense(xd).pow(2).sum().backward()
    assert_close_rel(x.grad, xd.grad, 1e-12, "input grad")
    assert_close_rel(layer.values.grad, dense.weight.grad[layer.mask()], 1e-12, "values grad")


def test_triton_gradcheck_float64(seed):
    g = torch.Generator().manual_seed(seed)
    w, mask = _weight(4, 5, 0.5, torch.float64, g)
    csr = sk.CSR.from_dense(w, mask)
    values = csr.values.clone().requires_grad_(True)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    with sk.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda x, v: sk.ops.spmm(x, v, *csr.pattern()), (x, values))


def test_triton_sparse24_compress_matches_the_python_definition(seed):
    from sparsekernels.formats import Sparse24, compress_24, prune_24

    g = torch.Generator().manual_seed(seed)
    for w in (torch.randn(6, 16, generator=g), torch.randn(4, 8, generator=g).round(), torch.ones(3, 8),
              torch.randn(5, 12, generator=g).half()):
        with sk.use_backend("triton"):
            s24, mask = compress_24(w)
        ref = prune_24(w)
        expected = Sparse24.from_dense(w, ref)
        assert torch.equal(mask, ref) and torch.equal(s24.values, expected.values) and torch.equal(s24.meta, expected.meta)
