"""The GPU benchmark's orchestration (order, time budget, checkpoints), run on the CPU with
the GPU-only pieces replaced: the GPU session is too short to find a Python error there."""

from __future__ import annotations

import pytest
import torch

from sparsekernels.bench import gpu


@pytest.fixture
def fake_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu, "measure_peaks", lambda: {"fp32_flops": 1.0, "bandwidth": 1.0})
    monkeypatch.setattr(gpu.harness, "machine_info", lambda device: {"device": device})

    def case(batch, in_f, out_f, sparsity, peaks):
        calls.append(((batch, in_f, out_f), sparsity))
        if sparsity == 0.5:
            raise RuntimeError("boom")
        return {"batch": batch, "in_features": in_f, "out_features": out_f, "sparsity": sparsity, "speedup": {}}

    monkeypatch.setattr(gpu, "run_case", case)
    for name in ("run_bsr_case", "run_regrowth_case", "run_sparse24_cases"):
        monkeypatch.setattr(gpu, name, lambda name=name: calls.append(name) or {"ok": name})
    return calls


def test_target_cases_run_first_then_extras_then_the_sweep(fake_gpu):
    saved = []
    payload = gpu.run(checkpoint=lambda p: saved.append(len(p["results"])))
    n_sweep = len(gpu.SHAPES) * len(gpu.SPARSITIES)
    assert fake_gpu[:len(gpu.PRIORITY_CASES)] == gpu.PRIORITY_CASES
    assert fake_gpu[len(gpu.PRIORITY_CASES):len(gpu.PRIORITY_CASES) + 3] == ["run_bsr_case", "run_regrowth_case",
                                                                             "run_sparse24_cases"]
    assert len(payload["results"]) == n_sweep and len(saved) == n_sweep + 3
    assert sum("error" in r for r in payload["results"]) == len(gpu.SHAPES)       # the failing cases are recorded
    assert payload["bsr"] == {"ok": "run_bsr_case"} and "auto_choices" in payload
    assert saved[:2] == [1, 2]                                                  # a checkpoint after every case


def test_time_budget_skips_cases_and_lists_them(fake_gpu):
    payload = gpu.run(time_budget_s=-1.0)
    assert payload["results"] == [] and len(payload["skipped_for_time"]) == len(gpu.SHAPES) * len(gpu.SPARSITIES)
    assert payload["sparse24"] == {"skipped_for_time": True}
