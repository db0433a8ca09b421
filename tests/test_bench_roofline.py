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
