"""The forward gather roofline of the CSR benchmark (sparsekernels/bench/roofline.py)."""

from __future__ import annotations

import math

import pytest
import torch

import sparsekernels as sk
from sparsekernels.bench import csr_linear, roofline

from conftest import make_csr


def _wide() -> int:
    """The width batches over 16 get for a narrow input: the kernel's rule (64 on Intel, 32
    on AMD) when the extension is loaded, else 64."""
    if sk._extension.compiled():
        return torch.ops.sparsekernels_C.cpu_panel_width(64, 1, 4)
    return 64


@pytest.mark.parametrize("batch", [1, 16, 17, 32, 33, 64, 65, 256])
def test_panel_width_and_gathers_follow_the_kernel(batch):
    # csrc/cpu/csr_common.h: 16-wide panels up to B = 16, at most 32 up to 32, else the
    # CPU's wide width.
    width = 16 if batch <= 16 else min(32, _wide()) if batch <= 32 else _wide()
    assert roofline.panel_width(batch) == width
    assert roofline.gathers(batch, 1000) == 1000 * math.ceil(batch / width)


def test_case_limits_arithmetic():
    # 256 x 4096 x 4096 at 90%: 1.68 M non-zeros, 4 panels of 64 (8 of 32 on AMD).
    nnz = 1_677_722
    lim = roofline.case_limits(256, nnz, dense_ms=40.0, ours_ms=10.0, l1_ns=0.5, goals={"fwd_vs_dense": 4.0})
    width = _wide()
    g = nnz * (256 // width)
    assert lim["gathers"] == g and lim["panel_width"] == width
    assert lim["gathered_gb"] == pytest.approx(g * 4 * width / 1e9)
    assert lim["ns_per_gather"] == pytest.approx(10e6 / g)
    assert lim["gather_gb_per_s"] == pytest.approx(g * 4 * width / 10e-3 / 1e9)
    # 4x dense leaves 10 ms: exactly the measured time.
    assert lim["needed_ns_per_gather"]["fwd_vs_dense"] == pytest.approx(lim["ns_per_gather"])
    assert lim["ceiling_if_l1"] == pytest.approx(40e6 / (g * 0.5))
    none = roofline.case_limits(256, nnz, 40.0, 10.0, None, {})
    assert none["ceiling_if_l1"] is None and none["needed_ns_per_gather"] == {}


def test_l1_probe_measures_a_positive_rate(one_thread):
    if not sk._extension.compiled():
        assert roofline.l1_ns_per_gather(32, 64, 48, 3) is None
        return
    # None only when noise swamped the slope (then the table shows no figure): retry.
    ns = next((v for v in (roofline.l1_ns_per_gather(32, 256, 48, 3) for _ in range(3)) if v is not None), None)
    # Tens of picoseconds (impossible: > 100 FMA lanes per ns) to microseconds per gather
    # would mean the slope measured something else.
    assert ns is not None and 0.05 < ns < 100


def test_benchmark_reports_the_roofline_for_its_target_cases(monkeypatch):
    # A target case gets the needed time per gather; the others only the measured side.
    monkeypatch.setitem(csr_linear.FORWARD_GOALS, (24, 64, 40, 0.9), 2.0)
    payload = csr_linear.run([(24, 64, 40)], [0.5, 0.9], rounds=2, torch_sparse=False)
    assert {r["fwd_backend"] for r in payload["results"]} == {"cpu"}   # too small to measure: the fixed order
    by = {r["sparsity"]: r["limits"] for r in payload["results"]}
    assert set(by[0.9]["needed_ns_per_gather"]) == {"fwd_vs_dense"}
    # Decode-sized batches on the first shape's layer, fp32 and bf16: both layers against dense.
    assert [(d["dtype"], d["batch"], d["in_features"], d["out_features"]) for d in payload["decode"]] == [
        (dtype, b, 64, 40) for dtype in ("float32", "bfloat16") for b in (1, 8, 32)]
    for d in payload["decode"]:
        assert set(d["vs_dense"]) == {"csr90", "sparse24"} and all(v > 0 for v in d["vs_dense"].values())
    assert by[0.5]["needed_ns_per_gather"] == {}
    for lim in by.values():
        assert lim["gathers"] > 0 and math.isfinite(lim["ns_per_gather"]) and lim["ns_per_gather"] > 0


def test_panel_width_of_a_wide_input_follows_the_compiled_rule():
    if not sk._extension.compiled():
        assert roofline.panel_width(256, 1 << 20) == 64
        return
    # The kernel narrows the panel where a 64-wide one of in_features rows would not fit
    # the L2: the roofline counts the gathers at the width the kernel runs.
    rule = torch.ops.sparsekernels_C.cpu_panel_width
    for k in (64, 4096, 11008, 1 << 16):
        t = roofline.panel_width(256, k)
        assert t == rule(256, k, 4) and t in (16, 32, 64)
        assert roofline.gathers(256, 1000, k) == 1000 * math.ceil(256 / t)
    narrow_input = roofline.panel_width(256)
    assert roofline.panel_width(256, 1 << 16) < narrow_input      # a 16 MiB 64-wide panel fits no L2
    lim = roofline.case_limits(256, 1000, 40.0, 10.0, 0.5, {}, in_features=1 << 16)
    # The L1 probe ran at the narrow-input width: not comparable.
    assert lim["panel_width"] < narrow_input and lim["l1_ns_per_gather"] is None


def test_half_pattern_keeps_every_other_nonzero_of_each_row():
    row_ptr = torch.tensor([0, 3, 3, 4, 8], dtype=torch.int32)
    col_idx = torch.tensor([0, 2, 5, 1, 0, 1, 2, 3], dtype=torch.int32)
    values = torch.arange(8.0)
    hv, hrp, hci = roofline.half_pattern(values, row_ptr, col_idx)
    assert hrp.tolist() == [0, 2, 2, 3, 5] and hrp.dtype == torch.int32
    assert hci.tolist() == [0, 5, 1, 0, 2] and hv.tolist() == [0.0, 2.0, 3.0, 4.0, 6.0]


def test_marginal_probe_and_ceiling(one_thread):
    csr = make_csr(512, 1024, 0.8, seed=3)
    rp, ci = csr.pattern()[:2]
    ns = roofline.marginal_ns_per_gather(torch.randn(64, 1024), csr.values, rp, ci, 3)
    if not sk._extension.compiled():
        assert ns is None
        return
    ns = ns or next((v for v in (roofline.marginal_ns_per_gather(torch.randn(64, 1024), csr.values, rp, ci, 3)
                                 for _ in range(3)) if v is not None), None)
    assert ns is not None and 0.05 < ns < 100
    lim = roofline.case_limits(64, csr.nnz, 40.0, 10.0, None, {}, in_features=1024)
    roofline.add_marginal(lim, 1.5, 40.0)
    assert lim["marginal_ns_per_gather"] == 1.5
    assert lim["ceiling_at_marginal"] == pytest.approx(40e6 / (lim["gathers"] * 1.5))
    empty: dict = {}
    roofline.add_marginal(empty, 1.5, 40.0)     # a case without a roofline (dense fallback) stays empty
    none = roofline.case_limits(64, csr.nnz, 40.0, 10.0, None, {}, in_features=1024)
    roofline.add_marginal(none, None, 40.0)     # noise swamped the slope: no figure
    assert empty == {} and "marginal_ns_per_gather" not in none


def test_sparse24_limits_arithmetic(monkeypatch):
    from sparsekernels import _extension
    monkeypatch.setattr(_extension, "compiled", lambda: True)
    monkeypatch.setattr(_extension, "cpu_simd_level", lambda: "avx512")
    lim = roofline.sparse24_limits(256, 4096, 4096, dense_ms=40.0, ours_ms=25.0)
    products = 4096 * 2048 * 4                                         # kept weights x 64-wide panels
    assert lim["gathers"] == products and lim["panel_width"] == 64
    assert lim["ns_per_gather"] == pytest.approx(25e6 / products)
    assert lim["fma_rate_vs_dense"] == pytest.approx(40.0 / 50.0)      # half the FMAs in 25 of 40 ms
    # The 2:4 kernel's panels follow the batch alone, however wide the input (the CSR rule
    # narrows them for an 11008-wide one).
    wide = roofline.sparse24_limits(256, 11008, 4096, dense_ms=40.0, ours_ms=25.0)
    assert wide["panel_width"] == 64 and wide["gathers"] == 4096 * 5504 * 4
    assert roofline.sparse24_limits(16, 4096, 4096, 1.0, 1.0)["panel_width"] == 16
    # Without AVX-512 the kernel's panels are at most 32 wide: twice the products.
    monkeypatch.setattr(_extension, "cpu_simd_level", lambda: "avx2")
    avx2 = roofline.sparse24_limits(256, 4096, 4096, dense_ms=40.0, ours_ms=25.0)
    assert avx2["panel_width"] == 32 and avx2["gathers"] == 2 * products
    assert roofline.sparse24_limits(16, 4096, 4096, 1.0, 1.0)["panel_width"] == 16
    assert "loop_ceiling_vs_dense" not in avx2                       # no loop rate given
    # The loop's rate bounds the forward: the products (every lane of a 32-wide panel row,
    # 2 FLOPs each: 4.29 GFLOP) at 400 GFLOP/s take 10.7 ms; dense took 40 (a ceiling of
    # 3.73x) and ours 25 ms, 0.43 of the loop's rate.
    bound = roofline.sparse24_limits(256, 4096, 4096, dense_ms=40.0, ours_ms=25.0, loop_gflops=400.0)
    ceiling_ms = 2 * products * 2 * 32 / 400e9 * 1e3
    assert ceiling_ms == pytest.approx(10.74, abs=0.01)
    assert bound["loop_ceiling_vs_dense"] == pytest.approx(40.0 / ceiling_ms)
    assert bound["share_of_loop_rate"] == pytest.approx(ceiling_ms / 25.0)


def test_sparse24_loop_probe():
    """The compiled loop probe: a positive rate, at every SIMD level; a bad reps count is
    a ValueError naming it."""
    import torch
    from sparsekernels import _extension
    if not _extension.compiled():
        pytest.skip("needs the compiled extension")
    C = torch.ops.sparsekernels_C
    try:
        for level in ("generic", "avx2", None):
            C.cpu_force_simd_level(level)
            assert 0 < C.cpu_sparse24_loop_gflops(3) < float("inf")
    finally:
        C.cpu_force_simd_level(None)
    rate = roofline.sparse24_loop_gflops(rounds=3, seconds_per_call=0.002)
    assert rate is not None and rate > 0
    with pytest.raises(ValueError, match="reps must be >= 1"):
        C.cpu_sparse24_loop_gflops(0)


def test_benchmark_reports_marginal_and_sparse24_limits(monkeypatch):
    monkeypatch.setitem(csr_linear.FORWARD_GOALS, (24, 64, 40, 0.9), 2.0)
    payload = csr_linear.run([(24, 64, 40)], [0.5, 0.9], rounds=3, torch_sparse=False, bf16_cases=False)
    (s24,) = payload["sparse24"]
    if s24["auto_choice"] == "cpu":
        assert s24["limits"]["gathers"] == 40 * 32 * 1 and s24["limits"]["ns_per_gather"] > 0
        assert s24["limits"]["fma_rate_vs_dense"] > 0
        assert s24["limits"]["loop_ceiling_vs_dense"] > 0 and s24["limits"]["share_of_loop_rate"] > 0
    else:
        assert "limits" not in s24
    # Only target cases get the marginal probe.
    by = {r["sparsity"]: r["limits"] for r in payload["results"]}
    assert "marginal_ns_per_gather" not in by[0.5]
    if "marginal_ns_per_gather" in by[0.9]:                          # unless noise won
        assert by[0.9]["marginal_ns_per_gather"] > 0 and by[0.9]["ceiling_at_marginal"] > 0
