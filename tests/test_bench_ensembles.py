"""``sparsekernels bench --scenario ensembles --quick``: the table, the JSON and the PNG."""

from __future__ import annotations

import json

import pytest

from sparsekernels import cli

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_thread")]


def test_bench_ensembles_quick(tmp_path, capsys):
    out = tmp_path / "ensembles.json"
    assert cli.main(["bench", "--scenario", "ensembles", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for text in ("dense", "edst", "dst_ensemble", "ensemble of the first k tickets", "CrAM+ step"):
        assert text in printed
    payload = json.loads(out.read_text())
    steps = payload["config"]["steps"]
    # EDST costs the steps of one dense run; the DST ensemble M times that.
    assert payload["dense"]["steps"] == payload["edst"]["steps"] == steps
    assert payload["dst_ensemble"]["steps"] == payload["config"]["tickets"] * steps
    assert [c["tickets"] for c in payload["edst"]["curve"]] == [1, 2, 3]
    for c in payload["edst"]["curve"] + payload["dst_ensemble"]["curve"]:
        assert 0 <= c["accuracy"] <= 1 and c["nll"] > 0 and 0 <= c["ece"] <= 1
    assert payload["cram"]["step_cost_vs_base"] > 1.0  # two forward / backward passes per step
    png = tmp_path / "ensembles.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
