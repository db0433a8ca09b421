"""The forward gather roofline of the CSR benchmark (sparsekernels/bench/roofline.py)."""

from __future__ import annotations

import math

import pytest
import torch

import sparsekernels as sk
from sparsekernels.bench import csr_linear, roofline


@pytest.mark.parametrize("batch,width,panels", [(1, 16, 1), (16, 16, 1), (17, 64, 1), (64, 64, 1), (65, 64, 2),
                                                (256, 64, 4)])
def test_panel_width_and_gathers_follow_the_kernel(batch, width, panels):
    # csrc/cpu/csr_common.h: 16-wide panels up to B = 16, else 64-wide.
    assert roofline.panel_width(batch) == width
    assert roofline.gathers(batch, 1000) == 1000 * panels


def test_case_limits_arithmetic():
    # 256 x 4096 x 4096 at 90%: 1.68 M non-zeros, 4 panels of 64.
    nnz = 1_677_722
    lim = roofline.case_limits(256, nnz, dense_ms=40.0, ours_ms=10.0, l1_ns=0.5, goals={"fwd_vs_dense": 4.0})
    g = nnz * 4
    assert lim["gathers"] == g and lim["panel_width"] == 64
    assert lim["gathered_gb"] == pytest.approx(g * 256 / 1e9)
    assert lim["ns_per_gather"] == pytest.approx(10e6 / g)
    assert lim["gather_gb_per_s"] == pytest.approx(g * 256 / 10e-3 / 1e9)
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
    assert roofline.panel_width(256, 1 << 16) < 64                  # a 16 MiB 64-wide panel fits no L2
    lim = roofline.case_limits(256, 1000, 40.0, 10.0, 0.5, {}, in_features=1 << 16)
    assert lim["panel_width"] < 64 and lim["l1_ns_per_gather"] is None   # the probe ran 64-wide: not comparable


def test_marginal_gather_cost_cancels_the_fixed_cost():
    # ours = fixed 2 ms + 1.5 ns per gather: the slope between two sparsities is 1.5 ns
    # whatever the fixed cost, and the ceiling is dense / (gathers x 1.5 ns).
    def case(sp, nnz):
        g = roofline.gathers(256, nnz, 4096)
        return {"sparsity": sp, "nnz": nnz, "batch": 256, "in_features": 4096, "dense_ms": 40.0,
                "ours_ms": 2.0 + g * 1.5e-6, "limits": {}}

    cases = [case(0.95, 838_861), case(0.9, 1_677_722), case(0.8, 3_355_443)]
    roofline.add_marginal(cases)
    by = {c["sparsity"]: c["limits"] for c in cases}
    assert by[0.8]["marginal_ns_per_gather"] == pytest.approx(1.5)
    assert by[0.9]["marginal_ns_per_gather"] == pytest.approx(1.5)
    g = roofline.gathers(256, 1_677_722, 4096)
    assert by[0.9]["ceiling_at_marginal"] == pytest.approx(40e6 / (g * 1.5))
    assert "marginal_ns_per_gather" not in by[0.95]                  # no sparser neighbour
    noisy = [case(0.9, 1_677_722), {**case(0.95, 838_861), "ours_ms": 100.0}]
    roofline.add_marginal(noisy)                                      # sparser measured slower: no figure
    assert all("marginal_ns_per_gather" not in c["limits"] for c in noisy)


def test_sparse24_limits_arithmetic():
    lim = roofline.sparse24_limits(256, 4096, 4096, dense_ms=40.0, ours_ms=25.0, l1_ns=0.6)
    width = roofline.panel_width(256, 4096)
    products = 4096 * 2048 * math.ceil(256 / width)                    # kept weights x panels
    assert lim["gathers"] == products and lim["panel_width"] == width
    assert lim["ns_per_gather"] == pytest.approx(25e6 / products)
    expected = 40e6 / (products * 0.6) if width == 64 else None
    assert lim["ceiling_if_l1"] == (pytest.approx(expected) if expected else None)
    assert roofline.sparse24_limits(256, 4096, 4096, 40.0, 25.0, None)["ceiling_if_l1"] is None


def test_sparse24_l1_probe_measures_a_positive_rate(one_thread):
    if not sk._extension.compiled():
        assert roofline.sparse24_l1_ns(32, 64, 3) is None
        return
    ns = next((v for v in (roofline.sparse24_l1_ns(64, 512, 3) for _ in range(3)) if v is not None), None)
    assert ns is not None and 0.05 < ns < 100


def test_benchmark_reports_marginal_and_sparse24_limits(monkeypatch):
    payload = csr_linear.run([(24, 64, 40)], [0.5, 0.9], rounds=3, torch_sparse=False, bf16_cases=False)
    (s24,) = payload["sparse24"]
    if s24["auto_choice"] == "cpu":
        assert s24["limits"]["gathers"] == 40 * 32 * 1 and s24["limits"]["ns_per_gather"] > 0
        l1 = s24["limits"]["l1_ns_per_gather"]
        assert l1 is None or (l1 > 0 and s24["limits"]["ceiling_if_l1"] > 0)
    else:
        assert "limits" not in s24
    # The 50% case has the 90% one as its sparser neighbour (a figure unless noise won).
    half = next(r for r in payload["results"] if r["sparsity"] == 0.5)["limits"]
    assert set(half) >= {"gathers", "ns_per_gather"}
    if "marginal_ns_per_gather" in half:
        assert half["marginal_ns_per_gather"] > 0 and half["ceiling_at_marginal"] > 0
