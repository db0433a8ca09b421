"""The CPU CSR kernels size their batch panels by the CPU and the L2 (csr_common.h:
choose_panel): 64, 32 or 16 columns wide by how many panel rows they gather. Every width
must give the same products, including the fused backward, whose one packing of dy
serves both."""

from __future__ import annotations

import pytest
import torch

import sparsekernels as sk

from conftest import assert_step_matches_reference, dense_of, make_csr, rel_error, with_threads

pytestmark = pytest.mark.skipif(not sk._extension.compiled(), reason="compiled extension not loaded")

BATCH = 40  # > 16: the width then follows the panel's size


def _width(k: int, dtype: torch.dtype) -> int:
    return torch.ops.sparsekernels_C.cpu_panel_width(BATCH, k, torch.empty((), dtype=dtype).element_size())


def _smallest_k_with(width: int, dtype: torch.dtype) -> int:
    """The smallest gathered-row count (a multiple of 8, from 8) that gets `width`."""
    k = 8
    while _width(k, dtype) > width:
        k *= 2
    lo, hi = k // 2, k                              # _width(lo) > width >= _width(hi)
    while hi - lo > 8:
        mid = (lo + hi) // 16 * 8
        lo, hi = (mid, hi) if _width(mid, dtype) > width else (lo, mid)
    return hi


@pytest.fixture
def force_width():
    """torch.ops.sparsekernels_C.cpu_force_panel_width, with the CPU's rule restored after
    the test."""
    f = torch.ops.sparsekernels_C.cpu_force_panel_width
    yield f
    f(0)


def test_width_shrinks_with_the_panel_and_follows_the_batch():
    f = torch.ops.sparsekernels_C.cpu_panel_width
    assert f(16, 100000, 4) == 16
    widths = [f(BATCH, k, 4) for k in (64, 4096, 8192, 16384, 65536)]
    assert widths == sorted(widths, reverse=True) and widths[-1] == 16
    assert f(BATCH, 2048, 8) == f(BATCH, 4096, 4)   # bytes, not elements
    if torch.ops.sparsekernels_C.cpu_is_amd():
        assert widths[:2] == [32, 32]               # AMD: 32 wide, 16 past twice the L2
    elif torch.ops.sparsekernels_C.cpu_simd_level() == "avx512":
        assert widths[:2] == [64, 64]               # the 1 MiB floor: as tuned on Intel
    else:
        assert widths[:2] == [32, 32]               # without AVX-512: at most 32 (widest_panel)


def test_batches_of_17_to_32_rows_get_at_most_32_wide_panels():
    """A 64-wide panel half empty costs what a full one does: batches of 17-32 rows get
    32-wide panels (or the rule's narrower width), the CSR rule and the 2:4 kernel's."""
    f = torch.ops.sparsekernels_C.cpu_panel_width
    for k in (64, 4096, 65536):
        for m in (17, 32):
            assert f(m, k, 4) == min(32, f(BATCH, k, 4))
        assert f(33, k, 4) == f(BATCH, k, 4)


def test_forced_width_overrides_the_rule_for_batches_over_16(force_width):
    f = torch.ops.sparsekernels_C.cpu_panel_width
    rule = [f(BATCH, k, 4) for k in (64, 65536)]
    for t in (64, 32, 16):
        force_width(t)
        assert f(BATCH, 64, 4) == t and f(BATCH, 65536, 4) == t and f(16, 64, 4) == 16
    force_width(0)
    assert [f(BATCH, k, 4) for k in (64, 65536)] == rule
    with pytest.raises(ValueError, match="16, 32 or 64"):
        force_width(48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [64, 32, 16])
def test_products_are_right_at_every_width(dtype, width, force_width, seed):
    # Every width on every machine kind (the CPU's own rule may never pick some of them).
    force_width(width)
    k = 2 * width + 37                              # in_features: forward and sddmm gather x rows
    assert _width(k, dtype) == width
    n = 24
    csr = make_csr(n, k, 0.9, dtype, seed=seed, empty_rows=True)
    w = dense_of(csr)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, k, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(BATCH, n, generator=g, dtype=torch.float64).to(dtype)
    C = torch.ops.sparsekernels_C
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_error(C.spmm(x, csr.values, csr.row_ptr, csr.col_idx, None, False), x.double() @ w.t()) < tol
    want_dv = (dy.double().t() @ x.double())[w != 0]
    # sddmm alone, and the fused backward (dy packed once, at the width the larger of the
    # two gathered panels needs).
    dv = C.sddmm(dy, x, csr.row_ptr, csr.col_idx, None)
    rows = torch.repeat_interleave(torch.arange(n), (csr.row_ptr[1:] - csr.row_ptr[:-1]).long())
    order = torch.argsort(rows * k + csr.col_idx.long())
    assert rel_error(dv[order], want_dv) < tol
    dx, dv2, _ = C.spmm_backward(dy, x, csr.values, csr.row_ptr, csr.col_idx, csr.t_row_ptr, csr.t_col_idx, csr.t_perm)
    assert rel_error(dx, dy.double() @ w) < tol and rel_error(dv2, dv) < tol
    # spmm_t gathers dy's rows: a wide output layer.
    wide = make_csr(k, n, 0.9, dtype, seed=seed + 1)
    dyk = torch.randn(BATCH, k, generator=g, dtype=torch.float64).to(dtype)
    got = C.spmm_t(dyk, wide.values, wide.t_row_ptr, wide.t_col_idx, wide.t_perm, None, False)
    assert rel_error(got, dyk.double() @ dense_of(wide)) < tol


@pytest.mark.parametrize("width", [64, 32, 16])
def test_layer_training_step_at_every_width_matches_reference(width, force_width, seed):
    force_width(width)
    k = 2 * width + 37
    layer = sk.SparseLinear(k, 24, sparsity=0.9)
    assert_step_matches_reference(layer, torch.randn(BATCH, k, requires_grad=True), backend="cpu")


def test_layer_training_step_at_the_rules_narrow_width_matches_reference(seed):
    k = _smallest_k_with(16, torch.float32) + 8
    assert _width(k, torch.float32) == 16
    layer = sk.SparseLinear(k, 24, sparsity=0.995)
    assert_step_matches_reference(layer, torch.randn(BATCH, k, requires_grad=True), backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [40, 150])
def test_forward_bits_do_not_depend_on_who_packs_x(force_width, dtype, batch):
    """The forward (spmm, and spmm_t through the transpose map) packs x's panels once for
    all threads, or lets each thread pack the panels its tasks read where there are at
    least as many panels as threads (csr_common.h: chunks_pack_own_panels). At 64 wide,
    40 rows are one panel: one thread packs its own, two share one packing; 150 rows are
    three panels: each thread packs its own either way. Every output must be bit for bit
    the same, and right against float64."""
    force_width(64)
    seed = torch.seed() % 2**31
    csr = make_csr(70, 90, 0.8, dtype, seed=seed, empty_rows=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 90, generator=g, dtype=dtype)
    dy = torch.randn(batch, 70, generator=g, dtype=dtype)
    bias = torch.randn(70, generator=g, dtype=dtype)
    C = torch.ops.sparsekernels_C
    outs = [with_threads(n, lambda: (C.spmm(x, csr.values, csr.row_ptr, csr.col_idx, None, False, bias),
                                     C.spmm_t(dy, csr.values, csr.t_row_ptr, csr.t_col_idx, csr.t_perm, None, False)))
            for n in (1, 2)]
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    for a, b in zip(*outs):
        assert torch.equal(a.view(bits), b.view(bits)), seed
    w = dense_of(csr)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_error(outs[0][0], x.double() @ w.t() + bias.double()) < tol, seed
    assert rel_error(outs[0][1], dy.double() @ w) < tol, seed
