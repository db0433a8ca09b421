"""``sparsekernels bench --scenario phases --quick`` at tiny sizes: the table, the JSON
(per-phase ratios, every switch, the CPU named) and the PNG are produced."""

from __future__ import annotations

import json

import pytest

from sparsekernels import cli
from sparsekernels.bench import phases


def test_phases_quick_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "phases.json"
    assert cli.main(["bench", "--scenario", "phases", "--quick", "--hidden", "32", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "compressed (C)" in text and "decompressed (D)" in text and "targets" in text
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "acdc_phases" and payload["machine"]["cpu"]
    assert payload["config"]["sizes"] == [1024, 32, 32, 256]
    # quick layout: phases of 2 steps, warm-up + 2 C/D pairs + final C = 12 steps, 5 switches
    assert len(payload["steps"]) == 12 and [s["entered"] for s in payload["switches"]] == \
        ["sparse", "dense", "sparse", "dense", "sparse"]
    assert [s["step"] for s in payload["switches"]] == [2, 4, 6, 8, 10]
    for phase in ("sparse", "dense"):
        r = payload["phases"][phase]
        assert r["steps"] >= 2 and r["median_step_s"] > 0 and r["speedup_vs_dense"] > 0
    assert all(s["dense_steps"] > 0 for s in payload["switches"])
    assert {t["met"] for t in payload["targets"]} <= {True, False} and len(payload["targets"]) == 3
    assert (tmp_path / "phases.png").stat().st_size > 0


def test_phases_rejects_too_short_phases():
    with pytest.raises(ValueError, match="phase_steps"):
        phases.run(hidden=16, phase_steps=1)
