"""The fp32 CPU kernels exist once per instruction set (csrc/cpu/simd_rows.inc: AVX-512,
AVX2 + FMA) besides the portable loops, and the CPU picks one at run time. Every level the
machine can run is forced here in turn, so an AVX-512 CI machine checks the AVX2 kernels
too: each product against float64, at every panel width, and the fused backward equal to
its two products bit for bit at that level."""

from __future__ import annotations

import pytest
import torch

import sparsekernels as sk

from conftest import SIMD_LEVELS as _ORDER, _levels, dense_of, make_csr, rel_error, with_threads

pytestmark = pytest.mark.skipif(not sk._extension.compiled(), reason="compiled extension not loaded")

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


def test_sparse24_mm_bits_do_not_depend_on_panels_or_threads(level, seed):
    """Every output element of the 2:4 kernel sums its terms in group order, whatever the
    plan (with AVX2 a task sweeps a group of up to 4 MiB of panels: 300 rows at K = 4096
    are 10 32-wide panels, a group of 8 and one of 2), the slices, the threads or where
    its batch row sits: rows 37.. of a 300-row product are bit for bit the product of
    those rows alone, at 1 and 2 threads, and match float64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(70, 4096, generator=g, dtype=torch.float64).float()
    s24 = sk.formats.Sparse24.from_dense(w)
    x = torch.randn(300, 4096, generator=g)
    C = torch.ops.sparsekernels_C
    full = [with_threads(n, lambda: C.sparse24_mm(x, s24.values, s24.meta, None)) for n in (1, 2)]
    part = [with_threads(n, lambda: C.sparse24_mm(x[37:], s24.values, s24.meta, None)) for n in (1, 2)]
    for y in full[1:] + part:
        assert torch.equal(y.view(torch.int32)[-part[0].shape[0]:], full[0][37:].view(torch.int32))
    assert rel_error(full[0], x.double() @ s24.to_dense().double().t()) < 1e-5


@pytest.mark.parametrize("out_f,in_f,sparsity", [(37, 61, 0.5), (70, 300, 0.97), (9, 20, 0.0), (12, 20, 1.0)])
def test_few_rows_csr_products_equal_a_larger_batch_bit_for_bit(level, out_f, in_f, sparsity, seed):
    """Batches of 1 and 2 rows run spmm_few (no panels) at the SIMD levels: its FMAs are the
    panel kernel's, so each row of the result is bit for bit that row of a 40-row batch,
    for spmm (with a bias) and spmm_t; rows of every length (empty, odd, 1..100 entries,
    four in lockstep and the rest alone), x as a transposed view, and in bf16 (its values
    widened by the kernel) too."""
    C = torch.ops.sparsekernels_C
    csr = make_csr(out_f, in_f, sparsity, seed=seed, empty_rows=True)
    w = dense_of(csr)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, in_f, generator=g)
    dy = torch.randn(40, out_f, generator=g)
    bias = torch.randn(out_f, generator=g)
    full = C.spmm(x, csr.values, csr.row_ptr, csr.col_idx, None, False, bias)
    full_t = C.spmm_t(dy, csr.values, csr.t_row_ptr, csr.t_col_idx, csr.t_perm, None, False)
    for m in (1, 2, 3):
        few = C.spmm(x[:m], csr.values, csr.row_ptr, csr.col_idx, None, False, bias)
        assert torch.equal(few.view(torch.int32), full[:m].view(torch.int32)), m
        few_t = C.spmm_t(dy[:m], csr.values, csr.t_row_ptr, csr.t_col_idx, csr.t_perm, None, False)
        assert torch.equal(few_t.view(torch.int32), full_t[:m].view(torch.int32)), m
    # Two rows as columns of a transposed [in_f, 2] buffer (not contiguous as [2, in_f]).
    xt = x[:2].t().contiguous().t()
    assert not xt.is_contiguous()
    assert torch.equal(C.spmm(xt, csr.values, csr.row_ptr, csr.col_idx, None, False, bias), full[:2])
    # bf16 values: widened by spmm_few as it reads them, by a copy before the panels; the
    # bits agree all the same.
    xb, vb = x.bfloat16(), csr.values.bfloat16()
    full_b = C.spmm(xb, vb, csr.row_ptr, csr.col_idx, None, False, bias.bfloat16())
    for m in (1, 2):
        yb = C.spmm(xb[:m], vb, csr.row_ptr, csr.col_idx, None, False, bias.bfloat16())
        assert yb.dtype == torch.bfloat16
        assert torch.equal(yb.view(torch.int16), full_b[:m].view(torch.int16)), m
        ref = xb[:m].double() @ w.float().bfloat16().double().t() + bias.bfloat16().double()
        assert rel_error(yb, ref) < 1e-2


def test_few_rows_csr_rejects_out_of_range_columns(level):
    C = torch.ops.sparsekernels_C
    csr = make_csr(70, 50, 0.5, seed=1)
    for pos in (0, csr.col_idx.numel() // 2, -1):
        for bad in (-1, 50):
            col_idx = csr.col_idx.clone()
            col_idx[pos] = bad
            for m in (1, 2):
                with pytest.raises(ValueError, match=r"col_idx entries must lie in \[0, 50\)"):
                    C.spmm(torch.randn(m, 50), csr.values, csr.row_ptr, col_idx, None, False)


@pytest.mark.parametrize("out_f,in_f", [(37, 36), (70, 100), (5, 8), (33, 4100), (40, 64)])
def test_sparse24_mm_few_rows_at_every_level(level, bf16_step, out_f, in_f, seed):
    """Batches of 1..8 rows run rows24_few (kept values against x through permutes; 9 rows
    run the panels): against float64 with a bias, for K with whole vectors of groups, one
    whole vector, groups past the last one, or none; 3-D and transposed inputs; bf16
    values and inputs through both bf16 steps (dot products, widening)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64).float()
    s24 = sk.formats.Sparse24.from_dense(w)
    wd = s24.to_dense().double()
    bias = torch.randn(out_f, generator=g)
    C = torch.ops.sparsekernels_C
    for m in range(1, 10):
        x = torch.randn(m, in_f, generator=g)
        y = C.sparse24_mm(x, s24.values, s24.meta, bias)
        assert y.shape == (m, out_f)
        assert rel_error(y, x.double() @ wd.t() + bias.double()) < 1e-5, m
    x3 = torch.randn(2, 3, in_f, generator=g)
    assert rel_error(C.sparse24_mm(x3, s24.values, s24.meta, None), x3.double() @ wd.t()) < 1e-5
    xt = torch.randn(in_f, 4, generator=g).t()
    assert rel_error(C.sparse24_mm(xt, s24.values, s24.meta, bias), xt.double() @ wd.t() + bias.double()) < 1e-5
    # bf16 values: rows24_few's dot or widening step, or widened before the panels (9 rows).
    for m in (1, 5, 8, 9):
        xb = torch.randn(m, in_f, generator=g).bfloat16()
        yb = C.sparse24_mm(xb, s24.values.bfloat16(), s24.meta, bias.bfloat16())
        assert yb.dtype == torch.bfloat16
        ref = xb.double() @ s24.to_dense().bfloat16().double().t() + bias.bfloat16().double()
        assert rel_error(yb, ref) < 1e-2, m


@pytest.fixture(params=["amx", "dot", "widen"])
def bf16_step(request):
    """How the 2:4 kernel multiplies a few bf16 rows: AMX tiles, AVX512-BF16 dot products or
    fp32 FMAs, forced in turn (skipped where this CPU, at the test's level, lacks it); the
    CPU's choice is restored."""
    C = torch.ops.sparsekernels_C
    C.cpu_force_bf16_step(request.param)
    if C.cpu_bf16_step() != request.param:
        C.cpu_force_bf16_step(None)
        pytest.skip(f"the 2:4 kernel cannot take the {request.param} step here")
    yield request.param
    C.cpu_force_bf16_step(None)


@pytest.mark.parametrize("in_f", [4100, 2112, 1040])
def test_sparse24_mm_few_rows_bits_do_not_depend_on_the_batch(level, bf16_step, in_f, seed):
    """rows24_few walks x in slices that stay in L1 when its M rows are wide, parking each
    row's accumulators between slices: the FMAs and their order are those of one pass, so a
    row's result has the same bits for every batch of 1..8 rows (K here spans slices at 8
    rows, in fp32 and bf16, with groups past the last whole vector). Not so for bf16 with
    the AMX step: 1-2 rows take the dot step and 3 or more the tiles, which sum in another
    order (and change it again past 16 rows)."""
    if bf16_step == "amx":
        pytest.skip("the AMX step does not keep a row's bf16 bits across batch sizes; rows24_few's steps do")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(70, in_f, generator=g)
    s24 = sk.formats.Sparse24.from_dense(w)
    C = torch.ops.sparsekernels_C
    x = torch.randn(8, in_f, generator=g)
    for values, xs, tol in ((s24.values, x, 1e-5), (s24.values.bfloat16(), x.bfloat16(), 1e-2)):
        if bf16_step != "widen" and xs.dtype != torch.bfloat16:
            continue
        full = C.sparse24_mm(xs, values, s24.meta, None)
        ref = xs.double() @ s24.to_dense().to(values.dtype).double().t()
        assert rel_error(full, ref) < tol
        for m in range(1, 8):
            few = C.sparse24_mm(xs[:m], values, s24.meta, None)
            assert torch.equal(few.view(torch.int16 if few.dtype == torch.bfloat16 else torch.int32),
                               full[:m].view(torch.int16 if full.dtype == torch.bfloat16 else torch.int32)), m


@pytest.mark.parametrize("out_f,in_f", [(37, 36), (100, 4100), (1, 8), (49, 520)])
def test_sparse24_mm_bf16_panels_match_and_keep_a_rows_bits(bf16_step, out_f, in_f, seed):
    """bf16 batches past the few-rows kernels: on AVX512-BF16 dot products with 16 output
    rows in the lanes (sparse24_dot.cpp; from 7 rows, past 32 with AMX), else the fp32
    panels. Against fp64, with a bias, odd shapes (partial blocks of 16 and 48 rows, batch
    tails of 1-6 rows, 4100 columns: two slices of groups), x not contiguous, values whose
    storage is not 4-byte aligned, and 1100 rows (three batch tasks); with the dot step a
    row's bits are the same for every batch and thread count (one dot product per group,
    in group order, whatever the blocking), and rounding is c10's (NaN as 0x7FC0)."""
    g = torch.Generator().manual_seed(seed)
    s24 = sk.formats.Sparse24.from_dense(torch.randn(out_f, in_f, generator=g))
    C = torch.ops.sparsekernels_C
    # values at an odd bf16 offset of their storage: not 4-byte aligned.
    flat = torch.empty(s24.values.numel() + 1, dtype=torch.bfloat16)
    values = flat[1:].view(s24.values.shape)
    values.copy_(s24.values)
    bias = torch.randn(out_f, generator=g).bfloat16()
    w = s24.to_dense().bfloat16().double()
    x = torch.randn(1100, in_f + 3, generator=g).bfloat16()[:, 3:]  # rows not contiguous
    rows = {}
    for m in (9, 17, 32, 33, 64, 65, 300, 1100):
        y = C.sparse24_mm(x[:m], values, s24.meta, bias)
        assert y.dtype == torch.bfloat16 and y.shape == (m, out_f)
        assert rel_error(y, x[:m].double() @ w.t() + bias.double()) < 1e-2, m
        rows[m] = y[:9].view(torch.int16)
    if bf16_step == "dot":
        for m, r in rows.items():
            assert torch.equal(r, rows[9]), m
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = C.sparse24_mm(x, values, s24.meta, bias)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one.view(torch.int16), C.sparse24_mm(x, values, s24.meta, bias).view(torch.int16))
        # NaNs in x make its row NaN, stored as c10 stores it; a weight row of zeros
        # gives exact zeros, and with a bias the bias itself.
        special = x[:12].clone()
        special[3, :4] = float("nan")  # every row keeps two of these
        zero_w = values.clone()
        zero_w[0] = 0
        y = C.sparse24_mm(special, zero_w, s24.meta, None)
        assert (y[3].view(torch.int16) == 0x7FC0).all()
        assert (y[torch.arange(12) != 3, 0].view(torch.int16) == 0).all()
        y = C.sparse24_mm(special, zero_w, s24.meta, bias)
        assert torch.equal(y[torch.arange(12) != 3, 0], bias[0].expand(11))
    bad = s24.meta.clone()
    bad[0, 0] = 0b0101  # i0 == i1
    with pytest.raises(ValueError, match="meta"):
        C.sparse24_mm(x[:40], values, bad, None)


def test_bf16_step_is_reported_forced_and_restored():
    C = torch.ops.sparsekernels_C
    best = C.cpu_bf16_step()
    assert best in ("amx", "dot", "widen")
    from sparsekernels import info

    assert info.collect()["cpu_bf16_step"] == best
    order = ("widen", "dot", "amx")
    try:
        for name in order:
            C.cpu_force_bf16_step(name)
            assert C.cpu_bf16_step() == (name if order.index(name) <= order.index(best) else best)
        C.cpu_force_bf16_step(None)
        C.cpu_force_simd_level("avx2")
        assert C.cpu_bf16_step() == "widen"  # the dot and AMX steps are AVX-512 code
        with pytest.raises(ValueError, match="'amx', 'dot', 'widen' or None"):
            C.cpu_force_bf16_step("avx512")
    finally:
        C.cpu_force_simd_level(None)
        C.cpu_force_bf16_step(None)
    assert C.cpu_bf16_step() == best


@pytest.mark.parametrize("out_f,in_f", [(37, 32), (70, 96), (33, 4096), (16, 64)])
def test_sparse24_mm_amx_rows(out_f, in_f, seed):
    """bf16 batches of 3 to 32 rows with K a multiple of 32 run on AMX tiles where the CPU
    has them (one or two blocks of 16 rows of x; 1 row takes the dot step, 33 the panels):
    against float64 with a bias, for N with a partial last task and tile, 3-D and
    transposed inputs. A smoke test of the tile configuration's restore: oneDNN's bf16
    GEMM, which may run AMX on the same threads, gives the same results after ours (it
    loads its own configuration per kernel, so this would not catch every leak)."""
    C = torch.ops.sparsekernels_C
    if C.cpu_bf16_step() != "amx":
        pytest.skip("no AMX-BF16 here")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    s24 = sk.formats.Sparse24.from_dense(w)
    values = s24.values.bfloat16()
    wd = s24.to_dense().bfloat16().double()
    bias = torch.randn(out_f, generator=g).bfloat16()
    dense_w = torch.randn(out_f, in_f, generator=g).bfloat16()
    for m in (1, 3, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33):
        x = torch.randn(m, in_f, generator=g).bfloat16()
        before = torch.nn.functional.linear(x, dense_w)
        y = C.sparse24_mm(x, values, s24.meta, bias)
        assert y.dtype == torch.bfloat16 and y.shape == (m, out_f)
        assert rel_error(y, x.double() @ wd.t() + bias.double()) < 1e-2, m
        assert torch.equal(torch.nn.functional.linear(x, dense_w), before), m
    for lead in ((2, 5), (2, 12)):
        x3 = torch.randn(*lead, in_f, generator=g).bfloat16()
        assert rel_error(C.sparse24_mm(x3, values, s24.meta, None), x3.double() @ wd.t()) < 1e-2
    xt = torch.randn(in_f, 20, generator=g).bfloat16().t()
    assert rel_error(C.sparse24_mm(xt, values, s24.meta, bias), xt.double() @ wd.t() + bias.double()) < 1e-2
    # Rows with every kept value zero, and zero x: exact zeros.
    zero_rows = values.clone()
    zero_rows[::3] = 0
    y0 = C.sparse24_mm(torch.ones(20, in_f).bfloat16(), zero_rows, s24.meta, None)
    assert torch.equal(y0[:, ::3], torch.zeros_like(y0[:, ::3]))
    assert torch.equal(C.sparse24_mm(torch.zeros(3, in_f).bfloat16(), values, s24.meta, None),
                       torch.zeros(3, out_f).bfloat16())


def test_sparse24_mm_amx_rejects_corrupt_meta():
    """A corrupt meta byte anywhere is a ValueError on the AMX step too, before the expand
    reads values through it."""
    C = torch.ops.sparsekernels_C
    if C.cpu_bf16_step() != "amx":
        pytest.skip("no AMX-BF16 here")
    s24 = sk.formats.Sparse24.from_dense(torch.randn(70, 64))
    values = s24.values.bfloat16()
    for bad in (0x3F, 0x05, 0xF4, 0x00):
        for row, col in ((0, 0), (69, 15), (40, 7)):
            meta = s24.meta.clone()
            meta[row, col] = bad
            with pytest.raises(ValueError, match="meta entries"):
                C.sparse24_mm(torch.randn(3, 64).bfloat16(), values, meta)
            with pytest.raises(ValueError, match="meta entries"):
                C.sparse24_mm(torch.randn(20, 64).bfloat16(), values, meta)


def test_sparse24_mm_few_rows_rejects_corrupt_meta_in_a_tail_group(level):
    """The last group of a row past the whole vectors is read one by one; a corrupt byte
    there is a ValueError too, before any value is read through it."""
    s24 = sk.formats.Sparse24.from_dense(torch.randn(40, 36))
    for bad in (0x3F, 0x05, 0xF4):
        meta = s24.meta.clone()
        meta[-1, -1] = bad
        with pytest.raises(ValueError, match="meta entries"):
            torch.ops.sparsekernels_C.sparse24_mm(torch.randn(1, 36), s24.values, meta)


def test_layer_training_step_at_every_level(level, seed):
    from conftest import assert_step_matches_reference

    layer = sk.SparseLinear(165, 24, sparsity=0.9)
    assert_step_matches_reference(layer, torch.randn(70, 165, requires_grad=True), backend="cpu")
