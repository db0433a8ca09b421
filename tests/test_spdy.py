"""SPDY (sparsekernels.spdy): the sparsity grid and error prior, the dynamic program against
brute force, the coefficient search, the pruned-weight database and calibration loss, the
timing database, end-to-end plans on an MLP and a CNN (predicted vs measured speed-up,
real sparse layers after apply), the CLI, and the errors on bad input.

Timing tests run on one thread (another process may hold the second core) and share their
searches through module fixtures. The 4096-wide MLP is marked slow and runs only when slow
tests are selected (``pytest tests/test_spdy.py -m slow``); ``sparsekernels spdy`` shows it.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import statistics

import pytest
import torch
from torch import nn

from sparsekernels import cli, oneshot, sparsify, spdy
from sparsekernels.bench.training import mlp
from sparsekernels.nn import SparseConv2d, SparseLinear
from sparsekernels.spdy.database import PrunedWeights
from sparsekernels.spdy.demo import cnn
from sparsekernels.spdy.dp import discretise
from sparsekernels.spdy.scoring import CalibrationLoss

AGREEMENT = 0.10  # predicted vs measured end-to-end speed-up, relative


@pytest.fixture(scope="module")
def single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_batches(shape, count=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(count)]


def assert_agrees(result, batch, retimes=3):
    """Predicted vs measured end-to-end speed-up within AGREEMENT. A machine shared with other
    jobs drifts over minutes: its dense-vs-sparse speed ratio moved by 10-20% between two
    timings a minute apart here, in either direction (one CI run: predicted 2.08x / measured
    1.80x, then 1.91x / 2.19x). When the gap is larger, the plan is timed again and the models
    measured again right after, up to ``retimes`` times, and the medians of all the
    predictions and all the measurements are compared: a prediction that is off stays off
    in the median, while drift in either direction cancels."""
    predicted, measured = [result.predicted_speedup], [result.measured_speedup]

    def gap():
        return abs(statistics.median(measured) / statistics.median(predicted) - 1)

    dense = result.dense_model
    while gap() > AGREEMENT and len(predicted) <= retimes:
        db = spdy.measure_timings(dense, batch, {n: dense.get_submodule(n) for n in result.plan},
                                  result.timings.levels, repeats=9, progress=False)
        predicted.append(db.dense_s / db.planned_s([result.level_index[n] for n in db.names]))
        measured.append(result.measure(rounds=15))
    pairs = ", ".join(f"{p:.3f}x / {m:.3f}x" for p, m in zip(predicted, measured))
    print(f"\nSPDY target {result.target_speedup}x: predicted / measured {pairs}")  # -s
    assert gap() <= AGREEMENT, (f"predicted / measured {pairs}: medians {statistics.median(predicted):.3f}x "
                                f"/ {statistics.median(measured):.3f}x\n" + result.table())


def assert_plan_applied(result, model):
    """Planned layers are real sparse layers at their planned sparsity; the others stay dense."""
    for name, s in result.plan.items():
        layer = model.get_submodule(name)
        if s > 0:
            assert isinstance(layer, (SparseLinear, SparseConv2d)), (name, type(layer))
            assert abs(layer.sparsity - s) < 0.01, (name, layer.sparsity, s)
        else:
            assert isinstance(layer, (nn.Linear, nn.Conv2d)), (name, type(layer))


def assert_within_budget(result):
    db = result.timings
    planned = sum(db.layers[n].time(i) for n, i in result.level_index.items())
    assert planned <= result.budget_s * (1 + 1e-12)
    assert result.predicted_speedup >= result.target_speedup * (1 - 1e-9)
    assert math.isclose(result.predicted_time_s, db.rest_s + planned)


# --------------------------------------------------------------------------- levels and prior
def test_error_prior_values():
    assert spdy.error_prior(5).tolist() == [0.0, 1 / 16, 1 / 4, 9 / 16, 1.0]
    e = spdy.error_prior(40)
    assert e[0] == 0 and e[-1] == 1 and math.isclose(e[13], (13 / 39) ** 2)
    with pytest.raises(ValueError):
        spdy.error_prior(1)


def test_default_levels_geometric_in_density():
    levels = spdy.default_levels()
    assert len(levels) == 40 and levels[0] == 0 and math.isclose(levels[-1], 0.99)
    density = 1 - torch.tensor(levels, dtype=torch.float64)
    ratios = density[1:] / density[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, 0.01 ** (1 / 39)))  # every step keeps the same fraction


def test_check_levels_forms():
    assert spdy.check_levels(3) == spdy.default_levels(3)
    assert torch.allclose(torch.tensor(spdy.default_levels(3)), torch.tensor((0.0, 0.9, 0.99)))
    assert spdy.check_levels([0.5, 0.9]) == (0.0, 0.5, 0.9)  # dense put in front
    assert spdy.check_levels((0, 0.5)) == (0.0, 0.5)


# --------------------------------------------------------------------------- dynamic program
def brute_force(costs, steps, buckets):
    best, best_plan = math.inf, None
    for plan in itertools.product(*(range(costs.shape[1]) for _ in range(costs.shape[0]))):
        if sum(steps[l, i] for l, i in enumerate(plan)) <= buckets:
            c = sum(costs[l, i] for l, i in enumerate(plan))
            if c < best:
                best, best_plan = c, plan
    return best, best_plan


def continuous_optimum(costs, times, budget):
    best = math.inf
    for plan in itertools.product(*(range(costs.shape[1]) for _ in range(costs.shape[0]))):
        if sum(times[l, i] for l, i in enumerate(plan)) <= budget:
            best = min(best, sum(costs[l, i] for l, i in enumerate(plan)))
    return best


@pytest.mark.parametrize("instance", range(4))
def test_dp_matches_brute_force(instance):
    g = torch.Generator().manual_seed(instance)
    layers, levels, buckets = 4, 5, 50
    costs = torch.rand(layers, levels, generator=g, dtype=torch.float64) * spdy.error_prior(levels)[None, :] * 3
    # Times fall with the level, as kernel time with sparsity; one row not monotone.
    times = 0.1 + 0.9 * torch.rand(layers, levels, generator=g, dtype=torch.float64).sort(dim=1, descending=True).values
    times[instance % layers] = 0.1 + 0.9 * torch.rand(levels, generator=g, dtype=torch.float64)
    low, high = times.min(dim=1).values, times.max(dim=1).values
    budget = float(low.sum() + 0.4 * (high - low).sum())
    plan, total = spdy.solve(costs, times, budget, buckets)
    steps = discretise(times, budget, buckets)
    want, _ = brute_force(costs, steps, buckets)
    assert math.isclose(total, want, rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(total, sum(costs[l, i] for l, i in enumerate(plan)), rel_tol=1e-12, abs_tol=1e-12)
    assert sum(steps[l, i] for l, i in enumerate(plan)) <= buckets
    assert sum(times[l, i] for l, i in enumerate(plan)) <= budget  # the real budget too
    # Rounding up costs at most one step per layer: the DP is between the continuous optima
    # of the budget and of the budget less one step per layer.
    step = budget / buckets
    assert continuous_optimum(costs, times, budget) <= total + 1e-12
    assert total <= continuous_optimum(costs, times, budget - layers * step) + 1e-12


def test_dp_infeasible_and_exact_fit():
    costs = [[0.0, 0.0], [0.0, 0.0]]
    times = [[2.0, 1.0], [2.0, 1.0]]
    assert spdy.solve(costs, times, 1.5, 100) is None
    plan, total = spdy.solve([[0.0, 1.0], [0.0, 5.0]], times, 3.0, 300)
    assert plan == [1, 0] and total == 1.0  # the cheaper layer gives up time
    with pytest.raises(ValueError, match="budget"):
        spdy.solve(costs, times, 0.0)


# --------------------------------------------------------------------------- coefficient search
def synthetic_problem(seed=0, layers=8, levels=12):
    """A DP instance whose true layer sensitivities are far from uniform: the score of a
    coefficient vector is the true error of the plan the DP makes from it."""
    g = torch.Generator().manual_seed(seed)
    prior = spdy.error_prior(levels)
    scale = 0.5 + 1.5 * torch.rand(layers, 1, generator=g, dtype=torch.float64)
    times = torch.linspace(1.0, 0.1, levels, dtype=torch.float64)[None, :] * scale
    budget = float(times.sum(dim=0)[levels // 2])
    true = (torch.rand(layers, generator=g, dtype=torch.float64) ** 3 * 10).tolist()

    def score(c):
        plan, _ = spdy.solve(c[:, None] * prior[None, :], times, budget, 2000)
        return float(sum(true[l] * prior[i] for l, i in enumerate(plan)))

    return score, layers


def test_coefficient_search_improves_keeps_and_is_deterministic():
    score, layers = synthetic_problem()
    c, best, history = spdy.coefficient_search(layers, score, steps=40, seed=3)
    assert len(history) == 40 and history[0]["phase"] == "uniform"
    bests = [h["best"] for h in history]
    assert all(b2 <= b1 for b1, b2 in zip(bests, bests[1:]))  # never worse
    assert best == bests[-1] == min(h["score"] for h in history) == score(c)
    assert best < history[0]["score"]  # better than the plain prior on this instance
    assert {h["phase"] for h in history} == {"uniform", "random", "local"}
    c2, best2, history2 = spdy.coefficient_search(layers, score, steps=40, seed=3)
    assert torch.equal(c, c2) and best == best2 and history == history2
    _, _, other = spdy.coefficient_search(layers, score, steps=40, seed=4)
    assert [h["score"] for h in other] != [h["score"] for h in history]


# --------------------------------------------------------------------------- pruned weights and loss
def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def test_magnitude_database_equals_magnitude_prune():
    model = small_model()
    layers = {n: model.get_submodule(n) for n in ("0", "3", "5")}
    db = PrunedWeights(model, layers, [], "magnitude")
    for name, layer in layers.items():
        for s in (0.3, 0.7, 0.95):
            want, _ = oneshot.magnitude_prune(layer.weight.detach().reshape(layer.weight.shape[0], -1), s)
            assert torch.equal(db.weight(name, s), want.reshape(layer.weight.shape))
    assert db.computed == 9 and db.weight("3", 0.7) is db.weight("3", 0.7)  # cached


def test_sparsegpt_database_equals_oneshot_prune_on_the_first_layer():
    model = small_model()
    data = random_batches((16, 3, 6, 6))
    layers = {n: model.get_submodule(n) for n in ("0", "3")}
    w = PrunedWeights(model, layers, data, "sparsegpt").weight("0", 0.6)
    # The first layer sees the same inputs in the sequential pruner: the same weights.
    pruned = oneshot.prune(model, data, method="sparsegpt", sparsity={"0": 0.6}, inplace=False, progress=False)
    assert isinstance(pruned[0], SparseConv2d) and isinstance(pruned[3], nn.Linear)
    torch.testing.assert_close(w, pruned[0].dense_weight(), rtol=0, atol=0)


def test_calibration_loss_stitches_and_restores():
    model = small_model()
    data = random_batches((16, 3, 6, 6))
    layers = {"3": model[3]}
    before = model[3].weight.detach().clone()
    loss = CalibrationLoss(model, layers, data)
    assert loss({}) == 0.0
    pruned = PrunedWeights(model, layers, data, "magnitude").weight("3", 0.9)
    assert loss({"3": pruned}) > 0
    assert torch.equal(model[3].weight, before)
    targets = [(x, torch.zeros(16, 4)) for x in data]
    by_fn = CalibrationLoss(model, layers, targets, loss_fn=lambda out, y: ((out - y) ** 2).mean())
    with torch.no_grad():
        want = sum(float((model(x) ** 2).mean()) for x in data) / 2
    assert math.isclose(by_fn({}), want, rel_tol=1e-6)


def test_prune_with_a_per_layer_dict():
    model = small_model()
    data = random_batches((16, 3, 6, 6))
    out = oneshot.prune(model, data, method="magnitude", sparsity={"3": 0.8, "5": 0.0}, inplace=False, progress=False)
    assert isinstance(out[3], SparseLinear) and abs(out[3].sparsity - 0.8) < 1e-3
    assert isinstance(out[0], nn.Conv2d) and isinstance(out[5], nn.Linear)
    with pytest.raises(ValueError, match="not prunable layers"):
        oneshot.prune(model, data, sparsity={"nope": 0.5}, inplace=False, progress=False)
    with pytest.raises(ValueError, match="per-layer"):
        oneshot.prune(model, data, sparsity={"3": 0.5}, pattern="2:4", inplace=False, progress=False)
    with pytest.raises(ValueError, match=r"sparsity\['3'\]"):
        oneshot.prune(model, data, sparsity={"3": 1.0}, inplace=False, progress=False)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def mlp_result(single_thread):
    model = mlp([1024] * 4, 0)
    data = random_batches((256, 1024))
    result = spdy.search(model, data, target_speedup=2.0, levels=10, method="sparsegpt", search_steps=12, seed=0,
                         repeats=7, apply=True, progress=False)
    return result, model, data


@pytest.fixture(scope="module")
def cnn_result(single_thread):
    model = cnn(32, seed=0)
    data = random_batches((64, 3, 32, 32))
    result = spdy.search(model, data, target_speedup=1.25, levels=10, method="magnitude", search_steps=8, seed=0,
                         repeats=7, apply=True, progress=False)
    return result, model, data


def test_mlp_plan_meets_target_and_prediction_agrees(mlp_result, single_thread):
    result, model, data = mlp_result
    assert list(result.plan) == ["0", "2", "4"]
    assert_within_budget(result)
    assert any(s > 0 for s in result.plan.values())
    assert_agrees(result, data[0])


def test_mlp_apply_gives_real_sparse_layers(mlp_result):
    result, model, data = mlp_result
    assert result.applied and result.model is model
    assert_plan_applied(result, model)
    assert result.apply() is model  # a second call changes nothing
    assert isinstance(result.dense_model[0], nn.Linear)


def test_cnn_plan_meets_target_and_prediction_agrees(cnn_result, single_thread):
    result, model, data = cnn_result
    assert list(result.plan) == ["0", "2", "4", "7", "9"]
    assert_within_budget(result)
    assert_plan_applied(result, model)
    # A level whose sparse kernel loses to dense is planned dense (sparsity 0).
    for name, i in result.level_index.items():
        assert (result.plan[name] > 0) == result.timings.layers[name].sparse_faster(i)
    assert_agrees(result, data[0])


def test_timing_database_contents(cnn_result):
    result, _, _ = cnn_result
    db = result.timings
    assert len(db.levels) == 10 and db.levels[0] == 0
    conv = db.layers["2"]
    assert conv.kind == "Conv2d" and conv.weight_shape == (32, 16, 3, 3) and conv.input_shape == (64, 16, 32, 32)
    assert db.layers["7"].input_shape == (64, 2048) and db.layers["7"].calls == 1
    times = db.times()
    assert times.shape == (5, 10)
    for row, lt in zip(times, db.layers.values()):
        assert lt.dense_s > 0 and lt.sparse_s[0] is None and row[0] == lt.dense_s
        for i, t in enumerate(lt.sparse_s):
            assert row[i] == (min(t, lt.dense_s) if t is not None else lt.dense_s)
    assert db.max_speedup() >= result.predicted_speedup
    back = spdy.TimingDB.from_dict(json.loads(json.dumps(db.to_dict())))
    assert back.to_dict() == db.to_dict()
    text = result.table()
    assert "predicted speed-up" in text and "measured" in text and all(n in text for n in db.names)


@pytest.mark.slow
def test_4096_wide_mlp_prediction_agrees(request, single_thread):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the 4096-wide MLP takes minutes: run with -m slow (sparsekernels spdy shows it too)")
    model = mlp([4096] * 5, 0)
    data = random_batches((256, 4096))
    result = spdy.search(model, data, target_speedup=2.0, levels=10, method="magnitude", search_steps=10, apply=True,
                         progress=False)
    assert_within_budget(result)
    assert_plan_applied(result, model)
    assert_agrees(result, data[0])


# --------------------------------------------------------------------------- CLI
def test_cli_writes_table_png_json(tmp_path, capsys, one_thread):
    rc = cli.main(["spdy", "--model", "mlp", "--width", "512", "--batch", "128", "--levels", "4",
                   "--search-steps", "3", "--repeats", "3", "--target-speedup", "1.3", "--out", str(tmp_path),
                   "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "sparsity" in out and "planned ms" in out and "predicted speed-up" in out
    (js,) = tmp_path.glob("spdy-mlp-cpu-*.json")
    if importlib.util.find_spec("matplotlib") is not None:  # the GPU machine's Python has none
        (png,) = tmp_path.glob("spdy-mlp-cpu-*.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert data["machine"]["cpu"] and data["config"]["levels"] == 4
    res = data["result"]
    assert set(res["plan"]) == {"0", "2", "4", "6"} and res["measured_speedup"] > 0
    assert res["predicted_speedup"] >= 1.3 and len(res["timings"]["levels"]) == 4


def test_cli_reports_an_unreachable_target(tmp_path, capsys, one_thread):
    rc = cli.main(["spdy", "--model", "mlp", "--width", "256", "--batch", "64", "--levels", "3",
                   "--repeats", "3", "--target-speedup", "1000", "--out", str(tmp_path), "--no-progress"])
    assert rc == 2 and "at most" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    for bad in ("0.5,1.5", "many"):
        assert cli.main(["spdy", "--width", "64", "--levels", bad, "--out", str(tmp_path)]) == 2
        assert "levels" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad input
def tiny():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("loader", [[], iter(())])
def test_empty_loader(loader):
    with pytest.raises(ValueError, match="loader"):
        spdy.search(tiny(), loader, target_speedup=2.0)


@pytest.mark.parametrize("target,exc", [(1.0, ValueError), (0.5, ValueError), (float("nan"), ValueError),
                                        (True, TypeError), ("2", TypeError)])
def test_bad_target_speedup(target, exc):
    with pytest.raises(exc, match="target_speedup"):
        spdy.search(tiny(), [torch.randn(4, 8)], target_speedup=target)


def test_target_beyond_reach_says_the_maximum(cnn_result):
    result, _, _ = cnn_result
    model = cnn(32, seed=0)
    most = result.timings.max_speedup()
    with pytest.raises(ValueError, match=rf"at most {most:.3f}x"):
        spdy.search(model, random_batches((64, 3, 32, 32)), target_speedup=most * 1.05, timings=result.timings,
                    progress=False)


@pytest.mark.parametrize("levels,exc", [([0.5, 1.0], ValueError), ([-0.1, 0.5], ValueError),
                                        ([0.5, 0.3], ValueError), ([0.3, 0.3], ValueError), ([], ValueError),
                                        (1, ValueError), ([0.0], ValueError), ("0.5", TypeError),
                                        ([0.5, "x"], TypeError)])
def test_bad_levels(levels, exc):
    with pytest.raises(exc, match="levels"):
        spdy.search(tiny(), [torch.randn(4, 8)], target_speedup=2.0, levels=levels)


def test_model_without_prunable_layers():
    with pytest.raises(ValueError, match="no prunable layers"):
        spdy.search(nn.Sequential(nn.ReLU()), [torch.randn(4, 8)], target_speedup=2.0)
    with pytest.raises(ValueError, match="no prunable layers"):  # already sparse: not re-planned
        spdy.search(sparsify(tiny(), 0.5), [torch.randn(4, 8)], target_speedup=2.0)


@pytest.mark.parametrize("kwargs,named", [({"damp": 0}, "damp"), ({"damp": "1"}, "damp"), ({"block_size": 0}, "block_size"),
                                          ({"cache_bytes": "x"}, "cache_bytes"), ({"seed": "a"}, "seed")])
def test_late_arguments_are_checked_before_the_timing(kwargs, named, monkeypatch):
    """They were first used after the timing pass (minutes on a real model): the error came
    late and opaque. Now they fail before anything is timed."""
    import importlib

    search_module = importlib.import_module("sparsekernels.spdy.search")  # the module, not the function
    monkeypatch.setattr(search_module, "measure_timings", lambda *a, **k: pytest.fail("timed before checking"))
    with pytest.raises(ValueError, match=named):
        spdy.search(tiny(), [torch.randn(4, 8)], target_speedup=2.0, **kwargs)


def test_levels_helpers_check_their_arguments():
    from sparsekernels.spdy.levels import default_levels, error_prior

    for count, top in ((1, 0.99), (0, 0.99), (3, 1.5), (3, 0.0), (2.0, 0.5)):
        with pytest.raises(ValueError):
            default_levels(count, top)
    for count in (1, 2.5, True):
        with pytest.raises(ValueError, match="count"):
            error_prior(count)
    assert default_levels(3, 0.75) == pytest.approx((0.0, 0.5, 0.75))


def test_unknown_method():
    with pytest.raises(ValueError, match="method"):
        spdy.search(tiny(), [torch.randn(4, 8)], target_speedup=2.0, method="obs")


def test_a_non_finite_calibration_loss_is_said_not_hidden():
    """A NaN weight made every candidate's score NaN, which never ranks better: the search
    returned its first plan with score inf and no word of why."""
    from sparsekernels.spdy.coefficients import coefficient_search

    with pytest.raises(ValueError, match="finite calibration loss"):
        coefficient_search(3, lambda c: float("nan"), steps=4)
    # A candidate that overflows is only never the best: the search goes on.
    scores = iter([float("nan"), 2.0, float("inf"), 1.0])
    _, best, _ = coefficient_search(3, lambda c: next(scores), steps=4)
    assert best == 1.0


def test_timing_helpers_check_their_arguments():
    from sparsekernels.spdy.timing import LayerTiming, TimingDB, measure_speedup, measure_timings

    model = tiny()
    layers = {"0": model[0], "2": model[2]}
    x = torch.randn(4, 8)
    for kwargs, match in (({"repeats": 0}, "repeats"), ({"levels": (0.5, 0.9)}, "levels"), ({"levels": 3}, "levels")):
        args = {"levels": (0.0, 0.5), **kwargs}
        with pytest.raises(ValueError, match=match):
            measure_timings(model, x, layers, args.pop("levels"), progress=False, **args)
    with pytest.raises(ValueError, match="prunable"):
        measure_timings(model, x, {"1": model[1]}, (0.0, 0.5), progress=False)
    for kwargs in ({"rounds": 0}, {"inner": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            measure_speedup(model, model, x, **kwargs)
    lt = LayerTiming("0", "linear", (8, 8), (4, 8), 1, 1e-3, [None])
    with pytest.raises(ValueError, match="one sparse time per level"):
        TimingDB((0.0, 0.5), {"0": lt}, 1e-3, 2e-3)
    db = TimingDB((0.0, 0.5), {"0": LayerTiming("0", "linear", (8, 8), (4, 8), 1, 1e-3, [None, 5e-4])}, 1e-3, 2e-3)
    with pytest.raises(ValueError, match="plan has"):
        db.planned_s([1, 1])
    with pytest.raises(ValueError, match="no layer"):
        TimingDB((0.0, 0.5), {}, 1e-3, 2e-3).max_speedup()
