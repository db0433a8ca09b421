"""The fp32 CPU kernels exist once per instruction set (csrc/cpu/simd_rows.inc: AVX-512,
AVX2 + FMA) besides the portable loops, and the CPU picks one at run time. Every level the
machine can run is forced here in turn, so an AVX-512 CI machine checks the AVX2 kernels
too: each product against float64, at every panel width, and the fused backward equal to
its two products bit for bit at that level."""

from __future__ import annotations

import pytest
import torch

import sparsekernels as sk

from conftest import dense_of, make_csr, rel_error

pytestmark = pytest.mark.skipif(not sk._extension.compiled(), reason="compiled extension not loaded")

_ORDER = ("generic", "avx2", "avx512")


def _levels() -> list[str]:
    """The levels this CPU can run (up to its best)."""
    return list(_ORDER[: _ORDER.index(torch.ops.sparsekernels_C.cpu_simd_level()) + 1])


@pytest.fixture(params=list(_ORDER))
def level(request):
    """Forces one instruction set for the test (skipped where the CPU lacks it), then
    restores the CPU's best and its panel rule."""
    C = torch.ops.sparsekernels_C
    if request.param not in _levels():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    C.cpu_force_simd_level(request.param)
    yield request.param
    C.cpu_force_simd_level(None)
    C.cpu_force_panel_width(0)


def test_level_is_reported_forced_and_restored():
    C = torch.ops.sparsekernels_C
    best = C.cpu_simd_level()
    assert best in _ORDER
    assert sk._extension.cpu_simd_level() == best
    from sparsekernels import info

    assert info.collect()["cpu_simd_path"] == best
    try:
        for name in _ORDER:
            C.cpu_force_simd_level(name)
            # A level above the CPU's runs the CPU's own.
            assert C.cpu_simd_level() == (name if name in _levels() else best)
            assert C.cpu_has_avx512() == (C.cpu_simd_level() == "avx512")
        with pytest.raises(ValueError, match="'avx512', 'avx2', 'generic' or None"):
            C.cpu_force_simd_level("sse")
    finally:
        C.cpu_force_simd_level(None)
    assert C.cpu_simd_level() == best


def test_widest_panel_follows_the_level(level):
    f = torch.ops.sparsekernels_C.cpu_panel_width
    widest = 64 if level == "avx512" else 32
    # The CSR rule never exceeds the widest panel the row kernels keep in registers.
    assert max(f(40, k, 4) for k in (8, 64, 1024, 4096)) <= widest
    assert f(16, 64, 4) == 16


def _w_order(csr, in_f):
    rows = torch.repeat_interleave(torch.arange(csr.row_ptr.numel() - 1), (csr.row_ptr[1:] - csr.row_ptr[:-1]).long())
    return torch.argsort(rows * in_f + csr.col_idx.long())


@pytest.mark.parametrize("width", [64, 32, 16])
@pytest.mark.parametrize("batch,out_f,in_f,sparsity", [(40, 24, 165, 0.9), (150, 37, 61, 0.5), (7, 19, 300, 0.97),
                                                       (70, 33, 40, 0.0), (40, 12, 20, 1.0)])
def test_csr_products_at_every_level_and_width(level, width, batch, out_f, in_f, sparsity, seed):
    """spmm, spmm_t, sddmm and spmm_backward (one sweep for several panels, two products
    for one) against float64: odd sizes, empty rows, rows of 1..100 entries (the groups of
    16 or 8 dot products and their tails), sparsity 0 and 1."""
    C = torch.ops.sparsekernels_C
    C.cpu_force_panel_width(width)
    csr = make_csr(out_f, in_f, sparsity, seed=seed, empty_rows=True)
    w = dense_of(csr)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_f, generator=g)
    dy = torch.randn(batch, out_f, generator=g)
    tol = 1e-5
    assert rel_error(C.spmm(x, csr.values, csr.row_ptr, csr.col_idx, None, False), x.double() @ w.t()) < tol
    dx = C.spmm_t(dy, csr.values, csr.t_row_ptr, csr.t_col_idx, csr.t_perm, None, False)
    assert rel_error(dx, dy.double() @ w) < tol
    dv = C.sddmm(dy, x, csr.row_ptr, csr.col_idx, None)
    assert rel_error(dv[_w_order(csr, in_f)], (dy.double().t() @ x.double())[w != 0]) < tol
    gx, gv, _ = C.spmm_backward(dy, x, csr.values, *csr.pattern())
    # Bit for bit (signed zeros included) whichever way spmm_backward took.
    assert torch.equal(gx.view(torch.int32), dx.view(torch.int32))
    assert torch.equal(gv.view(torch.int32), dv.view(torch.int32))


def test_fused_backward_signed_zeros_at_every_level(level):
    """dvalues of an all-zero dy row against an all-negative x (every product -0.0): the
    one-sweep way gives +0.0 as the two-op way does, at this level too."""
    C = torch.ops.sparsekernels_C
    csr = make_csr(40, 70, 0.5, seed=3)
    dy = torch.randn(150, 40)
    dy[:, :20] = 0.0
    x = -torch.rand(150, 70) - 0.5
    _, gv, _ = C.spmm_backward(dy, x, csr.values, *csr.pattern())
    apart = C.sddmm(dy, x, csr.row_ptr, csr.col_idx, None)
    assert (gv == 0).any() and not torch.signbit(gv[gv == 0]).any()
    assert torch.equal(gv.view(torch.int32), apart.view(torch.int32))


@pytest.mark.parametrize("batch", [5, 40, 150])
@pytest.mark.parametrize("out_f,in_f", [(40, 64), (37, 4100), (3, 8)])
def test_sparse24_mm_at_every_level(level, batch, out_f, in_f, seed):
    """2:4 against float64: 16- and wide panels (the batch rule), row counts that leave rows
    outside the lockstep groups, K long enough for several slices."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64).float()
    s24 = sk.formats.Sparse24.from_dense(w)
    x = torch.randn(batch, in_f, generator=g)
    bias = torch.randn(out_f, generator=g)
    y = torch.ops.sparsekernels_C.sparse24_mm(x, s24.values, s24.meta, bias)
    assert rel_error(y, x.double() @ s24.to_dense().double().t() + bias.double()) < 1e-5


def test_layer_training_step_at_every_level(level, seed):
    from conftest import assert_step_matches_reference

    layer = sk.SparseLinear(165, 24, sparsity=0.9)
    assert_step_matches_reference(layer, torch.randn(70, 165, requires_grad=True), backend="cpu")
