"""Classification metrics of predicted probabilities: accuracy, negative log-likelihood,
expected calibration error, and the prediction disagreement between ensemble members."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from .._checks import check_int


def _check_scores(name: str, probs: object) -> Tensor:
    if not isinstance(probs, Tensor) or not probs.is_floating_point():
        got = probs.dtype if isinstance(probs, Tensor) else type(probs).__name__
        raise TypeError(f"{name} must be a floating-point tensor of probabilities, got {got}")
    if probs.dim() != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"{name} must have shape [N, C] with N, C >= 1, got {tuple(probs.shape)}")
    return probs


def _check_probs(name: str, probs: object) -> Tensor:
    probs = _check_scores(name, probs)
    # Logits or scores where probabilities belong give an ECE above 1 and negative NLLs.
    tol = 1e-2 if probs.dtype in (torch.float16, torch.bfloat16) else 1e-4
    p = probs.detach().double()
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or bool(((p.sum(1) - 1).abs() > tol).any()):
        raise ValueError(f"{name} must hold probabilities (non-negative rows summing to 1, e.g. a softmax), not "
                         "logits or scores")
    return probs


def _check_targets(probs: Tensor, targets: object) -> Tensor:
    if not isinstance(targets, Tensor) or targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        got = targets.dtype if isinstance(targets, Tensor) else type(targets).__name__
        raise TypeError(f"targets must be an integer tensor of class indices, got {got}")
    if targets.shape != probs.shape[:1]:
        raise ValueError(f"targets must have shape [{probs.shape[0]}] (one class per row of probs), got "
                         f"{tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= probs.shape[1]):
        raise ValueError(f"targets must be class indices in [0, {probs.shape[1] - 1}]")
    return targets.long()


def expected_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """ECE (Guo et al., ICML 2017): the predictions are binned by confidence (the top
    probability) into ``n_bins`` equal-width bins (i/n, (i+1)/n]; ECE is the sum over
    bins of |bin| / N * |accuracy(bin) - mean confidence(bin)|.

    probs [N, C] float, targets [N] int -> a float in [0, 1]."""
    probs = _check_probs("probs", probs)
    targets = _check_targets(probs, targets)
    check_int("n_bins", n_bins)
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == targets).double()
    # Bin i holds confidences in (i/n, (i+1)/n]; ceil maps exactly i/n into bin i-1.
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, confidence)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    return float((conf_sum - acc_sum).abs().sum() / probs.shape[0])


def metrics(probs: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, float]:
    """Accuracy (fraction in [0, 1]), NLL (mean of -log p[target], natural log) and ECE
    (``n_bins`` confidence bins) of probabilities ``probs`` [N, C] against ``targets`` [N]
    (int class indices). A probability of exactly 0 for the target counts as the
    smallest positive float of ``probs``' dtype, so the NLL stays finite."""
    probs = _check_probs("probs", probs)
    targets = _check_targets(probs, targets)
    p_target = probs.gather(1, targets[:, None]).squeeze(1).double()
    nll = -torch.log(p_target.clamp_min(torch.finfo(probs.dtype).tiny))
    return {"accuracy": float((probs.argmax(dim=1) == targets).double().mean()),
            "nll": float(nll.mean()),
            "ece": expected_calibration_error(probs, targets, n_bins)}


def disagreement(probs_a: Tensor, probs_b: Tensor) -> float:
    """Fraction of samples on which two models' predicted classes (argmax) differ.
    probs_a, probs_b: [N, C] -> float in [0, 1]."""
    # Only the top class counts here: logits do as well as probabilities.
    probs_a, probs_b = _check_scores("probs_a", probs_a), _check_scores("probs_b", probs_b)
    if probs_a.shape != probs_b.shape:
        raise ValueError(f"probs_a and probs_b must have the same shape, got {tuple(probs_a.shape)} and "
                         f"{tuple(probs_b.shape)}")
    return float((probs_a.argmax(dim=1) != probs_b.argmax(dim=1)).double().mean())


def pairwise_disagreement(member_probs: Tensor) -> float:
    """Mean :func:`disagreement` over all pairs of members (FreeTickets' diversity
    measure). member_probs: [M, N, C]; 0.0 for a single member."""
    if not isinstance(member_probs, Tensor) or member_probs.dim() != 3:
        got = tuple(member_probs.shape) if isinstance(member_probs, Tensor) else type(member_probs).__name__
        raise ValueError(f"member_probs must be a tensor of shape [M, N, C], got {got}")
    if member_probs.shape[1] == 0:
        raise ValueError("member_probs holds no sample (N = 0): the disagreement is undefined")
    pairs = list(itertools.combinations(range(member_probs.shape[0]), 2))
    if not pairs:
        return 0.0
    return sum(disagreement(member_probs[i], member_probs[j]) for i, j in pairs) / len(pairs)
