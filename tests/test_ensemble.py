"""sparsekernels.ensemble: metrics against hand computations, the Ensemble module (mean of
softmax, built from sparse tickets), BatchNorm recalibration, argument checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sparsekernels import SparseLinear, sparsify
from sparsekernels.ensemble import (Ensemble, disagreement, expected_calibration_error, metrics,
                                    pairwise_disagreement, recalibrate_batchnorm)

# Confidences chosen away from the 15 bin edges (k / 15), so the hand binning is exact.
PROBS = torch.tensor([[0.90, 0.10], [0.09, 0.91], [0.62, 0.38], [0.30, 0.70]], dtype=torch.float64)
TARGETS = torch.tensor([0, 0, 1, 1])


def test_metrics_match_hand_computation():
    m = metrics(PROBS, TARGETS)
    # Predictions 0, 1, 0, 1 -> correct, wrong, wrong, correct.
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.09) + math.log(0.38) + math.log(0.7)) / 4)
    # Bins (i/15, (i+1)/15]: 0.90 and 0.91 share bin 13 (accuracy 1/2, confidence 0.905),
    # 0.62 is alone in bin 9 (wrong), 0.70 alone in bin 10 (right).
    ece = 2 / 4 * abs(0.5 - 0.905) + 1 / 4 * abs(0.0 - 0.62) + 1 / 4 * abs(1.0 - 0.70)
    assert m["ece"] == pytest.approx(ece)
    assert expected_calibration_error(PROBS, TARGETS, n_bins=1) == pytest.approx(abs(0.5 - (0.9 + 0.91 + 0.62 + 0.7) / 4))


def test_nll_finite_at_zero_probability_and_perfect_calibration():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    m = metrics(probs, torch.tensor([0, 1]))
    assert m == {"accuracy": 1.0, "nll": 0.0, "ece": 0.0}
    wrong = metrics(probs, torch.tensor([1, 1]))
    assert math.isfinite(wrong["nll"]) and wrong["nll"] > 40 and wrong["ece"] == pytest.approx(0.5)


def test_disagreement():
    a = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    b = torch.tensor([[0.1, 0.9], [0.3, 0.7], [0.7, 0.3]])
    c = torch.tensor([[0.1, 0.9], [0.7, 0.3], [0.3, 0.7]])
    assert disagreement(a, b) == pytest.approx(1 / 3)
    # pairs (a, b) 1/3, (a, c) 3/3, (b, c) 2/3
    assert pairwise_disagreement(torch.stack([a, b, c])) == pytest.approx((1 / 3 + 1 + 2 / 3) / 3)
    assert pairwise_disagreement(a[None]) == 0.0


@pytest.mark.parametrize("call, err, text", [
    (lambda: metrics(PROBS.long(), TARGETS), TypeError, "probs"),
    (lambda: metrics(PROBS[0], TARGETS), ValueError, "probs"),
    (lambda: metrics(PROBS, TARGETS.double()), TypeError, "targets"),
    (lambda: metrics(PROBS, TARGETS[:3]), ValueError, "targets"),
    (lambda: metrics(PROBS, TARGETS + 5), ValueError, "targets"),
    (lambda: metrics(PROBS, TARGETS, n_bins=0), ValueError, "n_bins"),
    (lambda: disagreement(PROBS, PROBS[:2]), ValueError, "same shape"),
    (lambda: pairwise_disagreement(PROBS), ValueError, "member_probs"),
    (lambda: Ensemble([]), ValueError, "at least one"),
    (lambda: Ensemble(nn.Linear(2, 2)), TypeError, "models"),
    (lambda: Ensemble([nn.Linear(2, 2), 3]), TypeError, r"models\[1\]"),
    (lambda: Ensemble.from_tickets(nn.Linear(2, 2), []), ValueError, "tickets"),
    (lambda: Ensemble.from_tickets(nn.Linear(2, 2), [3]), TypeError, r"tickets\[0\]"),
    (lambda: recalibrate_batchnorm(nn.BatchNorm1d(2), [], num_batches=0), ValueError, "num_batches"),
    (lambda: recalibrate_batchnorm(nn.BatchNorm1d(2), []), ValueError, "no batch"),
])
def test_bad_input(call, err, text):
    with pytest.raises(err, match=text):
        call()


def _sparse_mlp(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return sparsify(model, sparsity=0.7)


def test_ensemble_is_mean_of_softmax_and_tickets_keep_their_masks():
    models = [_sparse_mlp(s) for s in range(3)]
    tickets = [copy.deepcopy(m.state_dict()) for m in models]
    x = torch.randn(5, 8)
    expected = torch.stack([torch.softmax(m(x), -1) for m in models]).mean(0)
    direct = Ensemble(models)
    torch.testing.assert_close(direct(x), expected)
    # from a template whose masks differ from every ticket's: the members take the tickets'
    ens = Ensemble.from_tickets(_sparse_mlp(10), tickets)
    torch.testing.assert_close(ens(x), expected)
    assert torch.allclose(ens(x).sum(-1), torch.ones(5))
    for member, model in zip(ens.members, models):
        assert isinstance(member[0], SparseLinear)
        assert torch.equal(member[0].mask(), model[0].mask())
        assert member[0].nnz == model[0].nnz  # compressed: O(nnz) per ticket
    # from a factory as well
    ens2 = Ensemble.from_tickets(lambda: _sparse_mlp(11), tickets)
    torch.testing.assert_close(ens2(x), expected)
    report = ens.evaluate(x, torch.tensor([0, 1, 2, 0, 1]))
    assert set(report) == {"ensemble", "members", "disagreement"} and len(report["members"]) == 3
    assert ens.training  # evaluate restores the mode


def test_recalibrate_batchnorm_matches_the_data_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    bn = model[1]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(9.0)
    model.eval()
    data = [torch.randn(16, 4) * 3 + 1 for _ in range(4)]
    seen = recalibrate_batchnorm(model, [(x, torch.zeros(16)) for x in data])
    assert seen == 4 and not model.training and bn.momentum == 0.1
    with torch.no_grad():
        h = [model[0](x) for x in data]
    # Equal batch sizes: the mean of the batch means is the mean over all data, and the
    # running variance the mean of the (unbiased) batch variances.
    torch.testing.assert_close(bn.running_mean, torch.cat(h).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([t.var(0) for t in h]).mean(0))
    assert recalibrate_batchnorm(nn.Linear(2, 2), []) == 0
    assert recalibrate_batchnorm(model, data, num_batches=2) == 2
