"""Triton CSR kernels against the dense computation. On a GPU they run compiled (bf16
too); on a machine without one they run in Triton's interpreter (TRITON_INTERPRET=1, set
by conftest): small shapes, fp32 / fp16 / fp64 (bf16 is not exact in the interpreter)."""

import pytest
import torch

import sparsekernels as sk
from sparsekernels import backends

from conftest import assert_close_rel

# Compiled on the GPU where there is one (bench/gpu_check.sh runs this file there), else
# the CPU interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in backends.available(DEVICE),
                                reason="Triton not usable here (needs triton, and on the CPU TRITON_INTERPRET=1)")

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.float64] + ([torch.bfloat16] if DEVICE == "cuda" else [])
SHAPES = [(1, 7, 5), (5, 19, 23), (33, 17, 6)]  # (batch, in, out): batch 1 and odd sizes


def _weight(out_f, in_f, sparsity, dtype, g, empty_rows=False):
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    mask = torch.rand(out_f, in_f, generator=g) >= sparsity
    if empty_rows:
        mask[::3] = False
        mask[:, ::4] = False
    return (w * mask).to(dtype), mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 1.0])
def test_triton_ops_match_dense(dtype, shape, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    b, in_f, out_f = shape
    w, mask = _weight(out_f, in_f, sparsity, dtype, g, empty_rows=sparsity == 0.7)
    csr = sk.CSR.from_dense(w, mask).to(DEVICE)
    x = torch.randn(b, in_f, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(b, out_f, generator=g, dtype=torch.float64).to(dtype)
    wd, xd, dyd = w.double(), x.double(), dy.double()
    with sk.use_backend("triton"):
        y = sk.ops.spmm(x.to(DEVICE), csr.values, *csr.pattern())
        dx = sk.ops.spmm_t(dy.to(DEVICE), csr.values, *csr.pattern())
        dv = sk.ops.sddmm(dy.to(DEVICE), x.to(DEVICE), *csr.pattern())
    assert y.dtype == dx.dtype == dv.dtype == dtype
    assert y.device.type == DEVICE
    assert_close_rel(y, xd @ wd.t(), TOL[dtype], "triton spmm")
    assert_close_rel(dx, dyd @ wd, TOL[dtype], "triton spmm_t")
    assert_close_rel(dv, (dyd.t() @ xd)[mask], TOL[dtype], "triton sddmm")


def test_triton_batched_noncontiguous_input(seed):
    g = torch.Generator().manual_seed(seed)
    w, mask = _weight(6, 9, 0.5, torch.float32, g)
    csr = sk.CSR.from_dense(w, mask).to(DEVICE)
    x = torch.randn(9, 2, 3, generator=g).to(DEVICE).permute(1, 2, 0)  # [2, 3, 9], non-contiguous
    with sk.use_backend("triton"):
        y = sk.ops.spmm(x, csr.values, *csr.pattern())
    assert y.shape == (2, 3, 6)
    assert_close_rel(y, x.double() @ w.double().to(DEVICE).t(), 1e-5, "triton spmm 3-D")


def test_triton_layer_forward_backward(seed):
    torch.manual_seed(seed)
    layer = sk.SparseLinear(11, 7, sparsity=0.6, dtype=torch.float64).to(DEVICE)
    dense = layer.to_dense()
    x = torch.randn(4, 11, dtype=torch.float64, device=DEVICE, requires_grad=True)
    xd = x.detach().clone().requires_grad_(True)
    with sk.use_backend("triton"):
        layer(x).pow(2).sum().backward()
    dense(xd).pow(2).sum().backward()
    assert_close_rel(x.grad, xd.grad, 1e-12, "input grad")
    assert_close_rel(layer.values.grad, dense.weight.grad[layer.mask()], 1e-12, "values grad")


def test_triton_gradcheck_float64(seed):
    g = torch.Generator().manual_seed(seed)
    w, mask = _weight(4, 5, 0.5, torch.float64, g)
    csr = sk.CSR.from_dense(w, mask).to(DEVICE)
    values = csr.values.clone().requires_grad_(True)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g).to(DEVICE).requires_grad_(True)
    with sk.use_backend("triton"):
        assert torch.autograd.gradcheck(lambda x, v: sk.ops.spmm(x, v, *csr.pattern()), (x, values))


def test_triton_sparse24_compress_matches_the_python_definition(seed):
    from sparsekernels.formats import Sparse24, compress_24, prune_24

    g = torch.Generator().manual_seed(seed)
    for w in (torch.randn(6, 16, generator=g), torch.randn(4, 8, generator=g).round(), torch.ones(3, 8),
              torch.randn(5, 12, generator=g).half()):
        with sk.use_backend("triton"):
            s24, mask = compress_24(w.to(DEVICE))
        ref = prune_24(w)
        expected = Sparse24.from_dense(w, ref)
        assert torch.equal(mask.cpu(), ref) and torch.equal(s24.values.cpu(), expected.values) \
            and torch.equal(s24.meta.cpu(), expected.meta)
