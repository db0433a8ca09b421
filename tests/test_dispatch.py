"""Backend choice: the measured "auto" dispatch, its cache and overrides, and the GPU
launch plan (row order + narrow indices), which is device-generic and so checked here."""

from __future__ import annotations

import pytest
import torch

import sparsekernels as sk
from sparsekernels import backends
from sparsekernels.kernels.launch_plan import build_launch_plan, launch_plan

from conftest import assert_step_matches_reference, make_csr, rel_error

needs_ext = pytest.mark.skipif(not sk._extension.compiled(), reason="compiled extension not loaded")


@needs_ext
def test_auto_measures_each_problem_class_once(measure_everything, monkeypatch):
    csr = make_csr(64, 96, 0.8, seed=1)
    calls = []
    real = backends._measure
    monkeypatch.setattr(backends, "_measure", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    x = torch.randn(40, 96)
    y = sk.ops.spmm(x, csr.values, *csr.pattern())
    assert rel_error(y, x.double() @ csr.to_dense().double().t()) < 1e-5
    sk.ops.spmm(torch.randn(50, 96), csr.values, *csr.pattern())    # same class: batch bucket 64
    assert len(calls) == 1
    sk.ops.spmm(torch.randn(200, 96), csr.values, *csr.pattern())   # another batch bucket
    assert len(calls) == 2
    (entry, _) = [e for e in backends.measured() if e["op"] == "spmm"]
    assert entry["choice"] in ("cpu", "reference", "cpu:dense")
    assert set(entry["times_ms"]) == {"cpu", "reference", "cpu:dense"} and entry["rejected"] == {}
    assert entry["key"] == backends.shape_class(40, 64, 96, density=csr.nnz / (64 * 96))
    assert backends.measured_choice("spmm", x.device, x.dtype, entry["key"]) == entry["choice"]


@needs_ext
def test_training_step_under_measured_auto_matches_reference(measure_everything, seed):
    layer = sk.SparseLinear(48, 40, sparsity=0.7)
    assert_step_matches_reference(layer, torch.randn(33, 48, requires_grad=True))
    assert {e["op"] for e in backends.measured()} == {"spmm", "spmm_t", "sddmm"}


def test_wrong_or_failing_backend_is_rejected_with_a_warning(measure_everything):
    want = torch.arange(6.0)

    def run(backend):
        if backend == "cpu":
            return want + 1.0                                   # a broken kernel
        if backend == "triton":
            raise RuntimeError("cannot compile")                # a backend that cannot run
        return want.clone()

    with pytest.warns(RuntimeWarning, match="rejected"):
        got = backends.dispatch("toy", torch.device("cpu"), torch.float32, run, flops=1.0, key=(1,),
                                candidates=["cpu", "triton", "reference"])
    assert torch.equal(got, want)
    (entry,) = backends.measured()
    assert entry["choice"] == "reference"
    assert "differs" in entry["rejected"]["cpu"] and "cannot compile" in entry["rejected"]["triton"]


def test_measurement_interleaves_backends_and_keeps_the_median(measure_everything, monkeypatch):
    # A backend that is fast only when it ran just before (its buffers still in cache)
    # must not win on back-to-back repeats: rounds run one call of each backend in turn.
    log = []
    clock = [0.0]
    monkeypatch.setattr(backends.time, "perf_counter", lambda: clock[0])

    def run(backend):
        warm = bool(log) and log[-1] == backend
        log.append(backend)
        clock[0] += {"cpu": 1.0, "reference": 2.0, "cpu:dense": 3.0}[backend] if not warm else 0.5
        return torch.ones(3)

    monkeypatch.setattr(backends, "MEASURE_BUDGET_S", 10.0)   # first runs of 1-3 s: 3 rounds
    backends.dispatch("toy", torch.device("cpu"), torch.float32, run, flops=1.0, key=(2,),
                      candidates=["cpu:dense", "cpu", "reference"])
    (entry,) = backends.measured()
    assert entry["choice"] == "cpu" and entry["times_ms"] == {"reference": 2000.0, "cpu:dense": 3000.0, "cpu": 1000.0}
    timed = log[3:-1]                       # after the checked first runs, before the returned run
    assert timed == ["reference", "cpu:dense", "cpu"] * 3 and log[-1] == "cpu"

    # Past the first rounds only the contenders (within MEASURE_CONTENDER_RATIO of the
    # best) are timed again: here cpu alone, so no more rounds whatever the budget.
    backends.clear_measurements()
    log.clear()
    monkeypatch.setattr(backends, "MEASURE_BUDGET_S", 1e6)
    backends.dispatch("toy", torch.device("cpu"), torch.float32, run, flops=1.0, key=(3,),
                      candidates=["cpu:dense", "cpu", "reference"])
    assert len(log) == 3 + 3 * backends.MEASURE_REPS + 1


def test_measurement_gives_the_contenders_more_rounds(measure_everything, monkeypatch):
    # Two backends within MEASURE_CONTENDER_RATIO of each other get more interleaved
    # rounds (up to MEASURE_MAX_REPS in all, within the budget over the slower one's
    # median); the far slower reference is timed in the first rounds only, so it neither
    # costs those rounds nor churns the caches between them. A noisy first round does not
    # decide: cpu's first timed call is slow (cold), its steady cost below cpu:dense's.
    log = []
    clock = [0.0]
    monkeypatch.setattr(backends.time, "perf_counter", lambda: clock[0])

    def run(backend):
        log.append(backend)
        cold = backend == "cpu" and log.count("cpu") <= 2     # the checked first run and round 1
        clock[0] += {"cpu": 3.0 if cold else 1.0, "cpu:dense": 1.2, "reference": 5.0}[backend]
        return torch.ones(3)

    monkeypatch.setattr(backends, "MEASURE_BUDGET_S", 1e6)
    backends.dispatch("toy", torch.device("cpu"), torch.float32, run, flops=1.0, key=(5,),
                      candidates=["cpu:dense", "cpu", "reference"])
    (entry,) = backends.measured()
    reps, most = backends.MEASURE_REPS, backends.MEASURE_MAX_REPS
    timed = log[3:-1]
    assert timed[:3 * reps] == ["reference", "cpu:dense", "cpu"] * reps
    assert timed[3 * reps:] == ["cpu:dense", "cpu"] * (most - reps)
    assert log.count("reference") == 1 + reps
    assert entry["choice"] == "cpu" and log[-1] == "cpu"
    assert entry["times_ms"] == pytest.approx({"reference": 5000.0, "cpu:dense": 1200.0, "cpu": 1000.0})

    # Contenders go by their best round: cold for its checked run and two of the three
    # first rounds (median 3 s against 1.2), cpu still gets the rounds that show it faster.
    backends.clear_measurements()
    log.clear()

    def run_cold(backend):
        log.append(backend)
        cold = backend == "cpu" and log.count("cpu") <= 3
        clock[0] += {"cpu": 3.0 if cold else 1.0, "cpu:dense": 1.2, "reference": 5.0}[backend]
        return torch.ones(3)

    backends.dispatch("toy", torch.device("cpu"), torch.float32, run_cold, flops=1.0, key=(7,),
                      candidates=["cpu:dense", "cpu", "reference"])
    assert backends.measured()[0]["choice"] == "cpu" and log[-1] == "cpu"

    # The budget bounds the rounds by the slower contender's median: 6.1 s / 1.2 s -> 5 rounds.
    backends.clear_measurements()
    log.clear()
    monkeypatch.setattr(backends, "MEASURE_BUDGET_S", 6.1)
    backends.dispatch("toy", torch.device("cpu"), torch.float32, run, flops=1.0, key=(6,),
                      candidates=["cpu:dense", "cpu", "reference"])
    assert log[3:-1].count("cpu:dense") == 5 and log.count("reference") == 1 + reps


def test_no_backend_that_runs_is_a_clear_error(measure_everything):
    def run(backend):
        raise RuntimeError("broken")

    with pytest.raises(RuntimeError, match="no backend could run"), pytest.warns(RuntimeWarning):
        backends.dispatch("toy", torch.device("cpu"), torch.float32, run, flops=1.0, candidates=["cpu", "triton"])


def test_bad_input_raises_its_own_error_while_measuring(measure_everything):
    """The reference runs first; if it rejects the inputs, that error is the answer (not a
    "no backend" error), exactly as without measuring."""
    csr = make_csr(64, 96, 0.8, seed=2)
    col_idx = csr.col_idx.clone()
    col_idx[0] = 96                                            # out of range
    with pytest.raises(ValueError, match="col_idx"):
        sk.ops.spmm(torch.randn(40, 96), csr.values, csr.row_ptr, col_idx, *csr.pattern()[2:])
    assert backends.measured() == []


@pytest.mark.parametrize("how", ["override", "env_off", "small"])
def test_measuring_is_skipped(how, monkeypatch):
    backends.clear_measurements()
    seen = []

    def run(backend):
        seen.append(backend)
        return torch.zeros(1)

    flops = 0.0 if how == "small" else 1e12
    if how == "env_off":
        monkeypatch.setenv(backends.MEASURE_ENV_VAR, "0")
    ctx = sk.use_backend("reference") if how == "override" else sk.use_backend(None)
    with ctx:
        backends.dispatch("toy", torch.device("cpu"), torch.float32, run, flops=flops,
                          candidates=["cpu", "reference"])
    assert len(seen) == 1 and backends.measured() == []


def test_shape_class_buckets_batch_and_density():
    assert backends.shape_class(33, 8, 9, density=0.123) == (64, 8, 9, 0.1)
    assert backends.shape_class(64, 8, 9) == (64, 8, 9, None)
    assert backends.shape_class(0, 8, 9)[0] == 1
    assert backends.shape_class(1, 8, 9, density=0.98)[-1] == 1.0


def test_info_lists_measured_choices(measure_everything):
    backends.dispatch("toy", torch.device("cpu"), torch.float32, lambda b: torch.ones(2), flops=1.0, key=(2,),
                      candidates=["cpu", "reference"])
    from sparsekernels import info as info_module

    info = info_module.collect()
    assert [e["op"] for e in info["measured"]] == ["toy"]
    assert "auto" in info["dispatch_policy"]


# --------------------------------------------------------------------------- launch plan
@pytest.mark.parametrize("n_cols,narrow", [(1000, True), (1 << 15, True), ((1 << 15) + 1, False)])
def test_launch_plan_orders_rows_longest_first_and_narrows_indices(n_cols, narrow, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(50, 64, generator=g) < torch.rand(50, 1, generator=g)   # rows of varied length
    mask[3] = False
    csr = sk.CSR.from_dense(torch.randn(50, 64, generator=g) * mask, mask)
    col_idx = csr.col_idx.clone()
    col_idx[:5] = n_cols - 1 - torch.arange(5, dtype=torch.int32)           # extreme columns survive
    order, cols = build_launch_plan(csr.row_ptr, col_idx, n_cols)
    lengths = (csr.row_ptr[1:] - csr.row_ptr[:-1])[order.long()]
    assert order.dtype == torch.int32 and sorted(order.tolist()) == list(range(50))
    assert bool((lengths[:-1] >= lengths[1:]).all())
    assert cols.dtype == (torch.int16 if narrow else torch.int32)
    assert torch.equal(cols.to(torch.int32), col_idx)


def test_launch_plan_is_cached_and_follows_in_place_changes():
    csr = make_csr(20, 30, 0.5, seed=3)
    row_ptr, col_idx = csr.row_ptr.clone(), csr.col_idx.clone()
    first = launch_plan(row_ptr, col_idx, 30)
    assert all(a is b for a, b in zip(launch_plan(row_ptr, col_idx, 30), first))
    col_idx[0] = 29 - col_idx[0]                                              # in-place edit
    again = launch_plan(row_ptr, col_idx, 30)
    assert again[0] is not first[0] and int(again[1][0]) == int(col_idx[0])
    assert launch_plan(row_ptr, col_idx.clone(), 30)[0] is not again[0]       # another tensor
    with torch.inference_mode():
        inf_ptr, inf_idx = row_ptr.clone(), col_idx.clone()
        assert torch.equal(launch_plan(inf_ptr, inf_idx, 30)[1].int(), inf_idx)   # no version: uncached


def test_validated_pattern_is_not_rechecked_until_it_changes(monkeypatch):
    from sparsekernels.ops import _checks

    csr = make_csr(16, 24, 0.5, seed=4)
    pattern = tuple(t.clone() for t in csr.pattern())
    checks = []
    real = _checks._check_csr_contents
    monkeypatch.setattr(_checks, "_check_csr_contents", lambda *a: checks.append(a[0]) or real(*a))
    x = torch.randn(3, 24)
    with sk.use_backend("reference"):
        y = sk.ops.spmm(x, csr.values, *pattern)
        sk.ops.spmm(x, csr.values, *pattern)
        assert len(checks) == 1                                   # no second device sync
        pattern[1][0] = 24                                        # corrupt in place
        with pytest.raises(ValueError, match="col_idx"):
            sk.ops.spmm(x, csr.values, *pattern)
    assert len(checks) == 2
    assert rel_error(y, x.double() @ csr.to_dense().double().t()) < 1e-5


def test_nonzero_rows_match_the_reference_and_are_cached(seed):
    from sparsekernels.kernels.launch_plan import nonzero_rows

    csr = make_csr(30, 40, 0.7, seed=seed % 1000, empty_rows=True)
    rows = nonzero_rows(csr.row_ptr, csr.col_idx)
    assert rows.dtype == torch.int32 and torch.equal(rows.long(), sk.reference.csr_rows(csr.row_ptr))
    assert nonzero_rows(csr.row_ptr, csr.col_idx) is rows


@pytest.mark.skipif("triton" not in backends.available("cpu"), reason="Triton interpreter not available")
def test_triton_csr_ops_keep_int32_columns_for_wide_layers(seed):
    """in_features > 32768: the launch plan keeps int32 column indices (int16 would wrap).
    (spmm_t is left out: W^T's 33000 rows are 33000 interpreted programs.)"""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(3, 33000, generator=g) < 0.002
    mask[0, -1] = True                                         # the last column, beyond int16
    csr = sk.CSR.from_dense(torch.randn(3, 33000, generator=g) * mask, mask)
    x, dy = torch.randn(2, 33000, generator=g), torch.randn(2, 3, generator=g)
    w = csr.to_dense().double()
    with sk.use_backend("triton"):
        y = sk.ops.spmm(x, csr.values, *csr.pattern())
        dv = sk.ops.sddmm(dy, x, *csr.pattern())
    assert rel_error(y, x.double() @ w.t()) < 1e-5
    assert rel_error(dv, (dy.double().t() @ x.double())[mask]) < 1e-5


@pytest.mark.skipif("triton" not in backends.available("cpu"), reason="Triton interpreter not available")
def test_launch_plan_is_built_once_through_the_custom_op(monkeypatch):
    """The op layer hands the kernels the very tensor objects of the layer, so the cache hits."""
    from sparsekernels.kernels import launch_plan as lp

    builds = []
    real = lp.build_launch_plan
    monkeypatch.setattr(lp, "build_launch_plan", lambda *a: builds.append(1) or real(*a))
    layer = sk.SparseLinear(24, 16, sparsity=0.5)
    x = torch.randn(3, 24)
    with sk.use_backend("triton"):
        layer(x)
        layer(x)
    assert len(builds) == 1


def test_launch_plan_without_narrowing_does_not_keep_its_pattern_alive():
    import gc

    from sparsekernels.kernels import launch_plan as lp

    row_ptr = torch.tensor([0, 1, 2], dtype=torch.int32)
    col_idx = torch.tensor([5, 40000], dtype=torch.int32)
    order, cols = lp.launch_plan(row_ptr, col_idx, 40001)
    assert cols is col_idx
    before = len(lp._plans)
    del col_idx, cols
    gc.collect()
    assert len(lp._plans) == before - 1


def test_rows_sorted_detects_unsorted_rows_and_ignores_row_boundaries():
    from sparsekernels.kernels.launch_plan import rows_sorted

    row_ptr = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)                   # an empty row
    assert rows_sorted(row_ptr, torch.tensor([3, 7, 0, 1, 9, 2], dtype=torch.int32))
    assert not rows_sorted(row_ptr.clone(), torch.tensor([3, 7, 1, 0, 9, 2], dtype=torch.int32))
    assert not rows_sorted(row_ptr.clone(), torch.tensor([3, 3, 0, 1, 9, 2], dtype=torch.int32))  # repeated
    assert rows_sorted(torch.tensor([0, 0], dtype=torch.int32), torch.zeros(0, dtype=torch.int32))
    csr = make_csr(40, 50, 0.7, seed=5, empty_rows=True)
    assert rows_sorted(csr.row_ptr, csr.col_idx) and rows_sorted(csr.t_row_ptr, csr.t_col_idx)


@needs_ext
def test_measurements_save_and_load_round_trip(measure_everything, tmp_path, monkeypatch):
    csr = make_csr(64, 96, 0.8, seed=6)
    x = torch.randn(40, 96)
    sk.ops.spmm(x, csr.values, *csr.pattern())
    saved = backends.measured()
    path = tmp_path / "choices.json"
    backends.save_measurements(path)
    backends.clear_measurements()
    assert backends.load_measurements(path) == len(saved) == 1
    assert backends.measured()[0]["choice"] == saved[0]["choice"]
    calls = []
    monkeypatch.setattr(backends, "_measure", lambda *a, **k: calls.append(1))
    sk.ops.spmm(x, csr.values, *csr.pattern())                  # the loaded choice: no new measurement
    assert calls == []


def test_load_measurements_rejects_other_files_and_skips_unavailable_backends(measure_everything, tmp_path):
    import json

    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="save_measurements"):
        backends.load_measurements(bad)
    other = tmp_path / "other.json"
    entry = {"op": "spmm", "device": "cpu", "dtype": "float32", "key": [64, 8, 8, 0.5], "choice": "triton",
             "times_ms": {}, "rejected": {}}
    other.write_text(json.dumps({"format": "sparsekernels-measurements/1", "entries": [entry]}))
    assert backends.load_measurements(other) == 0                # the interpreter is never an auto choice


def test_a_bad_environment_variable_and_bad_measurement_files_are_named(tmp_path, monkeypatch):
    """SPARSEKERNELS_BACKEND=bogus failed every op with a message that never named the
    variable; load_measurements raised JSONDecodeError / KeyError / AttributeError and
    could stop with half a file adopted."""
    import json

    monkeypatch.setenv("SPARSEKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SPARSEKERNELS_BACKEND='bogus'"):
        backends.get_backend()
    monkeypatch.delenv("SPARSEKERNELS_BACKEND")
    good = {"op": "spmm", "device": "cpu", "dtype": "float32", "choice": "cpu", "key": [64, 8, 8, 0.5]}
    cases = [("{", "not JSON"), (json.dumps({"format": "sparsekernels-measurements/1", "entries": {}}), "list"),
             (json.dumps({"format": "sparsekernels-measurements/1", "entries": [good, {"op": 1}]}), "entry 1"),
             (json.dumps({"format": "sparsekernels-measurements/1",
                          "entries": [dict(good, choice="cpu:foo")]}), "names no backend")]
    backends.clear_measurements()
    before = backends.measured()
    for content, match in cases:
        (tmp_path / "m.json").write_text(content)
        with pytest.raises(ValueError, match=match):
            backends.load_measurements(tmp_path / "m.json")
        assert backends.measured() == before  # nothing adopted
    with pytest.raises(ValueError, match="not a file"):
        backends.load_measurements(tmp_path / "missing.json")
