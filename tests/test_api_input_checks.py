"""Public helpers outside the layers refuse bad input by name instead of returning a
silently wrong result (found by a review of the oneshot / ensemble / topology APIs, 12-03):
the one-shot pruners' block size, N:M pattern, sparsity, method and non-finite Hessians;
ensemble metrics given logits; BatchNorm recalibration that fails; growth with a keep
mask of the wrong length; grown positions outside the matrix or a group's block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsekernels.ensemble import expected_calibration_error, metrics
from sparsekernels.methods import recalibrate_batchnorm
from sparsekernels.nn import SparseConv2d, SparseLinear
from sparsekernels.oneshot import magnitude_prune, obc_prune, prune, sparsegpt_prune
from sparsekernels.oneshot.prune import prune_matrix
from sparsekernels.topology import grow_by_gradient, grow_random, inactive_count, update_layer


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    W, X = torch.randn(8, 16, generator=g), torch.randn(64, 16, generator=g)
    return W, 2 * X.t() @ X / 64


def test_one_shot_pruners_check_block_size_pattern_sparsity_and_method():
    W, H = _problem()
    for bad in (-1, 0, 2.0):
        with pytest.raises(ValueError, match="block_size"):
            sparsegpt_prune(W, H, 0.5, block_size=bad)
    with pytest.raises(ValueError, match="multiple of M"):
        prune(nn.Sequential(nn.Linear(16, 8)), [torch.randn(4, 16)], pattern="2:4", block_size=6)
    for bad in ((4, 2), (2, 2), (0, 4), (-1, 4), "2:4x"):
        with pytest.raises(ValueError, match="pattern"):
            obc_prune(W, H, 0.5, bad)
    assert int(obc_prune(W, H, 0.5, "2:4")[1].sum()) == 64  # a string pattern is parsed, not misread
    for bad in (1.5, -0.5, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            magnitude_prune(W, bad)
    with pytest.raises(ValueError, match="method"):
        prune_matrix(W, H[None], "magnitude", 0.5)
    with pytest.raises(ValueError, match="groups"):
        prune_matrix(W, H[None].expand(3, 16, 16), "sparsegpt", 0.5)
    with pytest.raises(ValueError, match="NaN or inf"):
        sparsegpt_prune(W, H * float("nan"), 0.5)
    with pytest.raises(ValueError, match="single layer"):
        prune(nn.Linear(16, 4), None, method="magnitude", sparsity=0.5)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        prune(model, [torch.full((4, 16), float("nan"))], method="sparsegpt", sparsity=0.5, progress=False)


def test_mfac_refuses_a_non_finite_or_non_scalar_loss():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    batches = [(torch.randn(4, 16), torch.randn(4, 4)) for _ in range(4)]
    for loss_fn, match in ((lambda out, y: (out - y).pow(2).mean() * float("nan"), "non-finite"),
                           (lambda out, y: (out - y).pow(2), "scalar")):
        with pytest.raises(ValueError, match=match):
            prune(model, batches, method="mfac", sparsity=0.5, loss_fn=loss_fn, num_grads=4, progress=False)


def test_ensemble_metrics_refuse_logits():
    y = torch.tensor([0, 1])
    for bad in (torch.tensor([[3.0, 0.5], [0.2, 2.0]]), torch.tensor([[0.5, float("nan")], [0.5, 0.5]]),
                torch.tensor([[1.5, -0.5], [0.5, 0.5]])):
        with pytest.raises(ValueError, match="probabilities"):
            metrics(bad, y)
        with pytest.raises(ValueError, match="probabilities"):
            expected_calibration_error(bad, y)
    assert metrics(torch.tensor([[0.6, 0.4], [0.3, 0.7]]), y)["accuracy"] == 1.0


def test_recalibrate_batchnorm_keeps_the_statistics_when_it_fails():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model.train()
    for _ in range(3):
        model(torch.randn(8, 4) * 3 + 1)
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_batchnorm(model, [])
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(model, [torch.randn(8, 4), torch.randn(8, 5)])
    assert all(torch.equal(v, before[k]) for k, v in model[1].state_dict().items())
    with pytest.raises(TypeError, match="model"):
        recalibrate_batchnorm(None, [torch.randn(8, 4)])


def test_growth_checks_keep_and_update_checks_grown_positions():
    torch.manual_seed(0)
    layer = SparseLinear(12, 8, sparsity=0.75)
    short = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="keep"):
        inactive_count(layer, short)
    with pytest.raises(ValueError, match="keep"):
        grow_random(layer, 2, torch.Generator().manual_seed(0), short)
    with pytest.raises(ValueError, match="keep"):
        grow_by_gradient(layer, torch.randn(4, 12), torch.randn(4, 8), 2, short)
    keep = torch.ones(layer.nnz, dtype=torch.bool)
    for rows, cols, match in (([0], [12], "outside"), ([0, 1], [0], "one length")):
        with pytest.raises(ValueError, match=match):
            update_layer(layer, keep, torch.tensor(rows), torch.tensor(cols))
    with pytest.raises(TypeError, match="grow_rows must be an integer tensor"):
        update_layer(layer, keep, torch.tensor([0.0]), torch.tensor([1]))
    conv = SparseConv2d(4, 4, 1, groups=2, sparsity=0.5)
    keep = torch.ones(conv.nnz, dtype=torch.bool)
    with pytest.raises(ValueError, match="group's block"):
        update_layer(conv, keep, torch.tensor([0]), torch.tensor([3]))  # row 0 (group 0), column of group 1


def test_remap_optimizer_state_and_drop_smallest_check_their_arguments():
    from sparsekernels.topology import drop_smallest, remap_optimizer_state

    param = nn.Parameter(torch.randn(6))
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.grad = torch.randn(6)
    opt.step()
    for source, old, match in ((torch.tensor([0, 9]), 6, "source entries"),
                               (torch.tensor([[0, 1]]), 6, "source must be 1-D"),
                               (torch.tensor([0, 1]), 4, "per-element state holds"),
                               (torch.tensor([0]), -1, "old_numel")):
        with pytest.raises(ValueError, match=match):
            remap_optimizer_state(opt, param, source, old)
    with pytest.raises(TypeError, match="source must be an integer tensor"):
        remap_optimizer_state(opt, param, torch.tensor([0.0, 1.0]), 6)
    assert opt.state[param]["momentum_buffer"].numel() == 6  # untouched by the refusals
    with pytest.raises(TypeError, match="optimizer"):
        remap_optimizer_state(None, param, torch.tensor([0]), 6)
    assert remap_optimizer_state(opt, param, torch.tensor([5, -1, 0]), 6) == 1
    assert opt.state[param]["momentum_buffer"].numel() == 3
    with pytest.raises(ValueError, match="1-D"):
        drop_smallest(torch.randn(2, 3), 1)
    with pytest.raises(ValueError, match="1-D"):
        drop_smallest([1.0, 2.0], 1)


def test_ensemble_refuses_members_of_other_classes_and_non_iterables():
    from sparsekernels.ensemble import Ensemble, pairwise_disagreement

    ens = Ensemble([nn.Linear(4, 3), nn.Linear(4, 5)])
    with pytest.raises(ValueError, match="differ in shape"):
        ens(torch.randn(2, 4))
    with pytest.raises(TypeError, match="iterable"):
        Ensemble(None)
    with pytest.raises(TypeError, match="iterable"):
        Ensemble.from_tickets(nn.Linear(4, 3), None)
    with pytest.raises(ValueError, match="no sample"):
        pairwise_disagreement(torch.zeros(2, 0, 3))


def test_woodbury_fisher_inverse_and_coefficient_search_check_their_arguments():
    from sparsekernels.oneshot.mfac import WoodburyFisherInverse
    from sparsekernels.spdy.coefficients import coefficient_search

    grads = torch.randn(4, 10, dtype=torch.float64)
    for kwargs, match in (({"block_size": 0}, "block_size"), ({"block_size": -3}, "block_size"),
                          ({"damp": "1"}, "damp"), ({"damp": 0.0}, "damp")):
        args = {"damp": 1e-3, **kwargs}
        with pytest.raises(ValueError, match=match):
            WoodburyFisherInverse(grads, args.pop("damp"), **args)
    finv = WoodburyFisherInverse(grads, 1e-3, 4)
    with pytest.raises(ValueError, match=r"x must be \[10\]"):
        finv.mul(torch.randn(7, dtype=torch.float64))
    for kwargs, match in (({"layers": 0}, "layers"), ({"steps": 0}, "steps"), ({"steps": -1}, "steps")):
        args = {"layers": 3, **kwargs}
        with pytest.raises(ValueError, match=match):
            coefficient_search(args.pop("layers"), lambda c: float(c.sum()), **args)


def test_prune_puts_every_layer_back_when_a_later_one_fails():
    """A failure halfway (here the second layer's inputs are NaN) had left the model part
    sparse, part dense; now every layer is put back as it was, weights untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].bias[0] = float("nan")  # layer 0's own inputs are finite, layer 2's are not
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or inf"):
        prune(model, [torch.randn(32, 16)], method="sparsegpt", sparsity=0.5, progress=False)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(v, before[k]) or (v.isnan() == before[k].isnan()).all() and
               torch.equal(v.nan_to_num(), before[k].nan_to_num()) for k, v in model.state_dict().items())


def test_obc_counts_as_the_other_pruners_and_takes_an_empty_layer():
    W, H = _problem()
    W = W[:3, :5]
    H = H[:5, :5]
    kept = [int(obc_prune(W, H, 0.5)[1].sum()), int(sparsegpt_prune(W, H, 0.5)[1].sum()),
            int(magnitude_prune(W, 0.5)[1].sum())]
    assert kept == [8, 8, 8]  # 15 weights at 0.5: OBC had kept 7
    out, mask = obc_prune(torch.randn(0, 5), H, 0.5)
    assert out.shape == (0, 5) and mask.shape == (0, 5)


def test_mfac_prune_and_calibration_helpers_check_their_arguments():
    from sparsekernels.oneshot.calibration import HessianAccumulator, collect_hessian, input_groups
    from sparsekernels.oneshot.memory import sparsegpt_peak_memory
    from sparsekernels.oneshot.mfac import mfac_prune

    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    batches = [(torch.randn(4, 16), torch.randn(4, 4))]
    loss = nn.functional.mse_loss
    for args, kwargs, match in ((({"0": model[0]}, 1.5), {}, "sparsity"), (({}, 0.5), {}, "layers"),
                                (({"0": model[0]}, 0.5), {"num_grads": 0}, "num_grads"),
                                (({"0": model[0]}, 0.5), {"recomputations": 0}, "recomputations")):
        with pytest.raises(ValueError, match=match):
            mfac_prune(model, args[0], batches, loss, args[1], **kwargs)
    with pytest.raises(ValueError, match="batches"):
        mfac_prune(model, {"0": model[0]}, [], loss, 0.5)
    with pytest.raises(ValueError, match="HessianAccumulator"):
        HessianAccumulator(1, 16).add(torch.randn(4, 16))
    with pytest.raises(TypeError, match="collect_hessian"):
        collect_hessian(model, None, [torch.randn(4, 16)])
    with pytest.raises(ValueError, match="Conv2d"):
        input_groups(nn.Conv2d(3, 4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="k must be"):
        sparsegpt_peak_memory(0)


def test_the_new_checks_keep_valid_use_working():
    """Regressions a review of the checks found (12-03): each valid case works again."""
    from sparsekernels.formats import is_24
    from sparsekernels.methods import LearnedSupermask

    # A float mask of exact 0 / 1 (torch.nn.utils.prune's weight_mask) is a mask.
    conv = nn.Conv2d(2, 4, 3)
    mask = (torch.rand(4, 2, 3, 3) > 0.5).float()
    assert torch.equal(SparseConv2d.from_dense(conv, mask=mask).mask(), mask.bool())
    # N:M with M not dividing SparseGPT's block size, for the pruners without blocks.
    model = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    prune(model, None, method="magnitude", pattern="1:3", progress=False)
    assert isinstance(model[0], SparseLinear)
    # The network a supermask search hands out trains.
    sm = LearnedSupermask(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), sparsity=0.5)
    assert all(p.requires_grad for p in sm.sparse_model().parameters())
    assert is_24(torch.tensor([[True, True, False, False]]), dim=-1)
    # SR-STE under autocast takes kept values in the autocast dtype.
    from sparsekernels.formats import compress_24
    from sparsekernels.ops import srste_linear

    w = torch.randn(8, 16)
    s24, m24 = compress_24(w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = srste_linear(torch.randn(2, 16), w, s24.meta, m24, kept_values=s24.values.bfloat16())
    assert y.dtype == torch.bfloat16


def test_mfac_failure_leaves_the_dense_weights_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}

    def loss_fn(out, y):  # finite on the first pass, NaN on the second recomputation
        calls["n"] += 1
        loss = (out - y).pow(2).mean()
        return loss if calls["n"] <= 4 else loss * float("nan")

    batches = [(torch.randn(4, 16), torch.randn(4, 4)) for _ in range(4)]
    with pytest.raises(ValueError, match="non-finite"):
        prune(model, batches, method="mfac", sparsity=0.5, loss_fn=loss_fn, num_grads=4, recomputations=2,
              progress=False)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_integer_arguments_share_one_check_and_wording():
    """Every integer argument goes through sparsekernels._checks.check_int: bools and
    floats are refused as well as values below the minimum, and the message names the
    owner and the argument with the same wording everywhere."""
    from sparsekernels._checks import check_int

    assert check_int("n", 3) == 3 and check_int("n", 0, minimum=0) == 0
    assert check_int("n", None, allow_none=True) is None
    for value, minimum, what in ((0, 1, "a positive int"), (-1, 0, "a non-negative int"), (1, 2, "an int >= 2"),
                                 (True, 1, "a positive int"), (2.0, 1, "a positive int"),
                                 (None, 1, "a positive int")):
        with pytest.raises(ValueError, match=f"^f: n must be {what}, got {value!r}$"):
            check_int("n", value, "f", minimum=minimum)
    with pytest.raises(ValueError, match="^n must be a positive int"):
        check_int("n", 0)  # no owner: no prefix

    from sparsekernels.comm import unpack_bits
    from sparsekernels.spdy.levels import default_levels, error_prior
    from sparsekernels.spdy.search import search

    with pytest.raises(ValueError, match="^default_levels: count must be an int >= 2, got 1$"):
        default_levels(1)
    with pytest.raises(ValueError, match=r"^error_prior: count \(levels\) must be an int >= 2, got True$"):
        error_prior(True)
    with pytest.raises(ValueError, match="^unpack_bits: n must be a non-negative int, got -1$"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), 2, -1)
    with pytest.raises(ValueError, match="^SparseConv2d: groups must be a positive int, got 0$"):
        SparseConv2d(4, 4, 3, groups=0)
    with pytest.raises(ValueError, match="^n_bins must be a positive int, got 0$"):
        expected_calibration_error(torch.full((2, 2), 0.5), torch.tensor([0, 1]), n_bins=0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="^spdy.search: buckets must be a positive int, got 0$"):
        search(model, [(torch.randn(2, 4), torch.tensor([0, 1]))], target_speedup=2.0, buckets=0)


def test_a_bias_must_be_one_dimensional():
    """A [1, N] bias passed the width check and was refused inside the kernel, under
    another op's name (srste_linear's said sparse24_mm)."""
    from sparsekernels import CSR, ops
    from sparsekernels.formats import Sparse24

    torch.manual_seed(0)
    w = torch.randn(8, 16)
    csr = CSR.from_dense(w)
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match=r"spmm: bias must be 1-D \[8\]"):
        ops.spmm(x, csr.values, *csr.pattern(), bias=torch.zeros(1, 8))
    s24 = Sparse24.from_dense(w)
    mask = s24.mask()
    with pytest.raises(ValueError, match=r"srste_linear: bias must be 1-D \[8\]"):
        ops.srste_linear(x, w, s24.meta, mask, 2e-4, bias=torch.zeros(1, 8))
