"""csr_dense_mm (C++): a CSR product as a dense GEMM of the densified weight, and its place
in measured "auto" as the CPU candidate "cpu:dense"."""

from __future__ import annotations

import pytest
import torch

import sparsekernels as sk
from sparsekernels import backends
from sparsekernels.ops import csr_matmul

from conftest import assert_step_matches_reference, dense_of, make_csr, rel_error

pytestmark = pytest.mark.skipif(not sk._extension.compiled(), reason="compiled extension not loaded")

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _op():
    return torch.ops.sparsekernels_C.csr_dense_mm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,sparsity,empty_rows", [((7, 13), 0.6, True), ((40, 33), 0.0, False),
                                                        ((33, 64), 1.0, False), ((1, 1), 0.5, False)])
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()])
def test_matches_the_dense_product_both_ways(dtype, shape, sparsity, empty_rows, lead, seed):
    out_f, in_f = shape
    csr = make_csr(out_f, in_f, sparsity, dtype, seed=seed, empty_rows=empty_rows)
    w = dense_of(csr)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(*lead, out_f, generator=g, dtype=torch.float64).to(dtype)
    y = _op()(x, csr.values, csr.row_ptr, csr.col_idx, in_f, False)
    dx = _op()(dy, csr.values, csr.row_ptr, csr.col_idx, in_f, True)
    assert y.dtype == dtype and y.shape == (*lead, out_f) and dx.shape == (*lead, in_f)
    assert rel_error(y, x.double() @ w.t()) <= TOL[dtype]
    assert rel_error(dx, dy.double() @ w) <= TOL[dtype]


def test_results_do_not_alias_the_reused_dense_buffer():
    # The dense weight lives in a per-thread workspace reused by the next call: a result
    # must stay what it was.
    a, b = make_csr(24, 20, 0.5, seed=1), make_csr(24, 20, 0.5, seed=2)
    x = torch.randn(3, 20)
    ya = _op()(x, a.values, a.row_ptr, a.col_idx, 20, False)
    keep = ya.clone()
    _op()(x, b.values, b.row_ptr, b.col_idx, 20, False)
    assert torch.equal(ya, keep)


def test_empty_shapes():
    csr = make_csr(6, 5, 0.5, seed=3)
    assert _op()(torch.randn(0, 5), csr.values, csr.row_ptr, csr.col_idx, 5, False).shape == (0, 6)
    none = make_csr(0, 5, 0.5, seed=3)
    assert _op()(torch.randn(4, 5), none.values, none.row_ptr, none.col_idx, 5, False).shape == (4, 0)
    assert torch.equal(_op()(torch.randn(4, 0), none.values, none.row_ptr, none.col_idx, 5, True),
                       torch.zeros(4, 5))


def test_bad_input_is_a_clear_error():
    csr = make_csr(6, 5, 0.5, seed=4)
    op = _op()
    with pytest.raises(ValueError, match="x"):
        op(torch.randn(3, 4), csr.values, csr.row_ptr, csr.col_idx, 5, False)       # wrong in_features
    with pytest.raises(ValueError, match="x"):
        op(torch.randn(3, 5), csr.values, csr.row_ptr, csr.col_idx, 5, True)        # transpose wants out_features
    with pytest.raises(TypeError):
        op(torch.randn(3, 5, dtype=torch.float64), csr.values, csr.row_ptr, csr.col_idx, 5, False)
    bad = csr.col_idx.clone()
    bad[0] = 5
    with pytest.raises(ValueError, match="col_idx"):
        op(torch.randn(3, 5), csr.values, csr.row_ptr, bad, 5, False)
    with pytest.raises(ValueError, match="n_cols"):
        op(torch.randn(3, 5), csr.values, csr.row_ptr, csr.col_idx, -1, False)


def test_auto_measures_the_dense_variant_for_every_csr_product(measure_everything):
    layer = sk.SparseLinear(48, 40, sparsity=0.7)
    x = torch.randn(33, 48, requires_grad=True)
    layer(x).square().sum().backward()
    by_op = {e["op"]: e for e in backends.measured()}
    for op in ("spmm", "spmm_t", "sddmm"):
        assert set(by_op[op]["times_ms"]) == {"cpu", "reference", "cpu:dense"}, op
    assert all(e["rejected"] == {} for e in by_op.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,sparsity,empty_rows", [((7, 13), 0.6, True), ((40, 33), 0.0, False),
                                                        ((33, 64), 1.0, False)])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (0,)])
def test_csr_dense_sddmm_matches_the_dense_product_at_the_pattern(dtype, shape, sparsity, empty_rows, lead, seed):
    """sddmm's "cpu:dense" variant: the dense dy^T x (summed over every leading dimension)
    at the pattern's entries, in the pattern's order."""
    out_f, in_f = shape
    csr = make_csr(out_f, in_f, sparsity, dtype, seed=seed, empty_rows=empty_rows)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(*lead, out_f, generator=g, dtype=torch.float64).to(dtype)
    got = torch.ops.sparsekernels_C.csr_dense_sddmm(dy, x, csr.row_ptr, csr.col_idx)
    full = dy.double().reshape(-1, out_f).t() @ x.double().reshape(-1, in_f)
    rows = torch.repeat_interleave(torch.arange(out_f), csr.row_ptr.diff().long())
    want = full[rows, csr.col_idx.long()]
    assert got.dtype == dtype and got.shape == (csr.col_idx.numel(),)
    if want.numel():
        assert rel_error(got, want) <= TOL[dtype] or float(want.abs().max()) == 0.0


def test_csr_dense_sddmm_rejects_bad_input():
    csr = make_csr(6, 5, 0.5, seed=4)
    op = torch.ops.sparsekernels_C.csr_dense_sddmm
    with pytest.raises(ValueError, match="dy"):
        op(torch.randn(3, 5), torch.randn(3, 5), csr.row_ptr, csr.col_idx)          # dy wants 6 columns
    with pytest.raises(TypeError):
        op(torch.randn(3, 6), torch.randn(3, 5, dtype=torch.float64), csr.row_ptr, csr.col_idx)
    with pytest.raises(ValueError, match="leading"):
        op(torch.randn(3, 6), torch.randn(4, 5), csr.row_ptr, csr.col_idx)
    bad = csr.col_idx.clone()
    bad[0] = 5
    with pytest.raises(ValueError, match="col_idx"):
        op(torch.randn(3, 6), torch.randn(3, 5), csr.row_ptr, bad)


def test_training_step_on_the_dense_variant_matches_reference(measure_everything, monkeypatch, seed):
    layer = sk.SparseLinear(48, 40, sparsity=0.7)
    x = torch.randn(33, 48, requires_grad=True)
    # Pin "cpu:dense" as the measured choice of spmm / spmm_t for this problem class.
    args = csr_matmul._dispatch_args(x, layer.row_ptr, layer.t_row_ptr, layer.nnz, dense_variant=True)
    args_t = csr_matmul._dispatch_args(torch.empty(33, 40), layer.row_ptr, layer.t_row_ptr, layer.nnz,
                                       dense_variant=True)
    for op, a in (("spmm", args), ("spmm_t", args_t)):
        backends._measured[(op, "cpu", "float32", *a["key"])] = {
            "op": op, "device": "cpu", "dtype": "float32", "key": a["key"], "choice": "cpu:dense",
            "times_ms": {}, "rejected": {}}
    # Not the fused C++ backward: spmm_t is planned on "cpu:dense".
    monkeypatch.setattr(csr_matmul, "_spmm_backward_cpu_op", lambda *a: pytest.fail("fused backward used"))
    calls = []
    real = torch.ops.sparsekernels_C.csr_dense_mm
    monkeypatch.setattr(csr_matmul, "_compiled",
                        lambda name: (lambda *a: calls.append(a[-1]) or real(*a)) if name == "csr_dense_mm"
                        else getattr(torch.ops.sparsekernels_C, name))
    assert_step_matches_reference(layer, x)
    assert sorted(calls) == [False, True]                  # forward and input gradient densified


def test_dense_variant_only_under_auto_on_the_cpu(monkeypatch):
    x = torch.randn(4, 8)
    rp = torch.zeros(7, dtype=torch.int32)
    trp = torch.zeros(9, dtype=torch.int32)
    # Below the measuring threshold neither candidates nor a shape class are worked out.
    assert csr_matmul._dispatch_args(x, rp, trp, 0, dense_variant=True) == {"flops": 2.0 * 4 * 6 * 8, "key": (),
                                                                            "candidates": None}
    monkeypatch.setattr(backends, "MEASURE_MIN_FLOPS", 0.0)
    assert "cpu:dense" in csr_matmul._dispatch_args(x, rp, trp, 0, dense_variant=True)["candidates"]
    assert csr_matmul._dispatch_args(x, rp, trp, 0)["candidates"] is None
    with sk.use_backend("cpu"):
        assert csr_matmul._dispatch_args(x, rp, trp, 0, dense_variant=True)["candidates"] is None


def test_sparse24_forward_measures_and_runs_the_dense_variant(measure_everything, seed):
    layer = sk.nn.Sparse24Linear(64, 24, bias=True)
    x = torch.randn(5, 64)
    want = x.double() @ layer.dense_weight().double().t() + layer.bias.double()
    assert rel_error(layer(x), want) < 1e-5
    (entry,) = [e for e in backends.measured() if e["op"] == "sparse24_mm"]
    assert set(entry["times_ms"]) == {"cpu", "reference", "cpu:dense"} and entry["rejected"] == {}
    backends._measured[("sparse24_mm", "cpu", "float32", *entry["key"])]["choice"] = "cpu:dense"  # pin it
    assert backends.measured_choice("sparse24_mm", x.device, x.dtype, entry["key"]) == "cpu:dense"
    assert rel_error(layer(x), want) < 1e-5


def test_srste_forward_is_measured_apart_and_runs_the_dense_variant(measure_everything):
    # SR-STE's forward op is measured under its own name, so a choice stored for
    # Sparse24Linear never reaches it; pinned to "cpu:dense" it runs the decompressed GEMM.
    layer = sk.nn.Sparse24Linear(64, 24, bias=False)
    x = torch.randn(5, 64)
    layer(x)
    (entry,) = [e for e in backends.measured() if e["op"] == "sparse24_mm"]
    backends._measured[("sparse24_mm", "cpu", "float32", *entry["key"])]["choice"] = "cpu:dense"
    w = layer.dense_weight().detach().clone().requires_grad_()
    want = x.double() @ layer.dense_weight().double().t()
    y = sk.ops.srste_linear(x, w, layer.meta, layer.mask().bool())
    assert rel_error(y, want) < 1e-5
    assert {e["op"] for e in backends.measured()} == {"sparse24_mm", "sparse24_linear_forward"}
    (srste,) = [e for e in backends.measured() if e["op"] == "sparse24_linear_forward"]
    assert set(srste["times_ms"]) == {"cpu", "reference", "cpu:dense"}
    backends._measured[("sparse24_linear_forward", "cpu", "float32", *srste["key"])]["choice"] = "cpu:dense"
    assert rel_error(sk.ops.srste_linear(x, w, layer.meta, layer.mask().bool()), want) < 1e-5


_LEVELS = ("generic", "avx2", "avx512")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_f,in_f", [(7, 36), (40, 100), (33, 64), (5, 4100), (3, 32), (1, 4)])
def test_sparse24_dense_mm_matches_the_dense_product(dtype, out_f, in_f, seed):
    """sparse24_dense_mm decompresses the 2:4 weight (expand instructions at the AVX-512
    level where the CPU has VBMI2, group by group elsewhere and past the last whole vector)
    and runs the dense GEMM: against float64 at every level this CPU runs, with a bias,
    1-D to 3-D inputs and rows of zeros; empty shapes."""
    C = torch.ops.sparsekernels_C
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64).to(dtype)
    s24 = sk.formats.Sparse24.from_dense(w)
    values = s24.values.clone()
    values[::2] = 0
    wd = s24.to_dense().to(dtype).double()
    wd[::2] = 0
    bias = torch.randn(out_f, generator=g, dtype=torch.float64).to(dtype)
    levels = _LEVELS[: _LEVELS.index(C.cpu_simd_level()) + 1]
    try:
        for level in levels:
            C.cpu_force_simd_level(level)
            for lead in ((), (5,), (2, 3)):
                x = torch.randn(*lead, in_f, generator=g, dtype=torch.float64).to(dtype)
                y = C.sparse24_dense_mm(x, values, s24.meta, bias)
                assert y.dtype == dtype and y.shape == (*lead, out_f)
                assert rel_error(y, x.double() @ wd.t() + bias.double()) <= TOL[dtype], (level, lead)
            assert rel_error(C.sparse24_dense_mm(x, values, s24.meta), x.double() @ wd.t()) <= TOL[dtype]
    finally:
        C.cpu_force_simd_level(None)
    assert C.sparse24_dense_mm(torch.randn(0, in_f).to(dtype), values, s24.meta).shape == (0, out_f)
    empty = sk.formats.Sparse24.from_dense(torch.randn(0, in_f).to(dtype))
    assert C.sparse24_dense_mm(torch.randn(3, in_f).to(dtype), empty.values, empty.meta).shape == (3, 0)


def test_sparse24_dense_mm_rejects_bad_input():
    C = torch.ops.sparsekernels_C
    s24 = sk.formats.Sparse24.from_dense(torch.randn(40, 100))
    levels = _LEVELS[: _LEVELS.index(C.cpu_simd_level()) + 1]
    try:
        for level in levels:
            C.cpu_force_simd_level(level)
            for bad in (0x3F, 0x05, 0xF4, 0x00):
                for row, col in ((0, 0), (39, 24), (20, 9)):  # col 24: past the last whole vector
                    meta = s24.meta.clone()
                    meta[row, col] = bad
                    for dtype in (torch.float32, torch.bfloat16):  # expand24_floats / _words
                        with pytest.raises(ValueError, match="meta entries"):
                            C.sparse24_dense_mm(torch.randn(3, 100).to(dtype), s24.values.to(dtype), meta)
    finally:
        C.cpu_force_simd_level(None)
    with pytest.raises(ValueError, match="do not match"):
        C.sparse24_dense_mm(torch.randn(3, 100), s24.values[:, :-2], s24.meta)
    with pytest.raises(TypeError, match="meta must be uint8"):
        C.sparse24_dense_mm(torch.randn(3, 100), s24.values, s24.meta.int())
    with pytest.raises((ValueError, TypeError), match="x"):
        C.sparse24_dense_mm(torch.randn(3, 99), s24.values, s24.meta)
    with pytest.raises((ValueError, TypeError), match="bias"):
        C.sparse24_dense_mm(torch.randn(3, 100), s24.values, s24.meta, torch.randn(39))


def test_a_stored_choice_outside_the_candidates_is_measured_again(measure_everything):
    key = (8, 4, 4, None)
    backends._measured[("toy", "cpu", "float32", *key)] = {"op": "toy", "device": "cpu", "dtype": "float32",
                                                          "key": key, "choice": "cpu:dense", "times_ms": {},
                                                          "rejected": {}}
    ran = []
    out = backends.dispatch("toy", torch.device("cpu"), torch.float32, lambda b: ran.append(b) or torch.ones(2),
                            flops=1.0, key=key, candidates=["cpu", "reference"])
    assert torch.equal(out, torch.ones(2)) and "cpu:dense" not in ran and {"cpu", "reference"} <= set(ran)
    assert backends.measured_choice("toy", torch.device("cpu"), torch.float32, key) in ("cpu", "reference")


@pytest.mark.parametrize("winner", ["cpu", "cpu:dense"])
def test_workspace_is_released_only_when_the_dense_variant_lost(measure_everything, monkeypatch, winner):
    import time

    released = []
    monkeypatch.setattr(csr_matmul, "_release_workspace", lambda: released.append(1))
    lead = torch.empty(4, 8)
    args = {"flops": 1.0, "key": (winner,), "candidates": ["cpu", "reference", "cpu:dense"]}

    def run(backend):
        if backend != winner:
            time.sleep(0.002)          # every other candidate is slower
        return torch.ones(3)

    csr_matmul.dispatch_measured("toy", lead, run, args)
    csr_matmul.dispatch_measured("toy", lead, run, args)          # measured already: nothing more
    assert backends.measured_choice("toy", lead.device, lead.dtype, args["key"]) == winner
    assert released == ([1] if winner == "cpu" else [])
