"""Schedules of the sparse-training methods (pure functions of the step), and the
learning-rate schedulers for retraining after a prune (FT, LRW, SLR, CLR, ALLR)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

from .._checks import check_int


def cosine_drop_fraction(step: int, alpha: float, t_end: int) -> float:
    """RigL's drop fraction: alpha/2 * (1 + cos(pi * t / T_end)) for t <= T_end, else 0."""
    if step > t_end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / t_end))


def gmp_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta's cubic schedule s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3, with
    n dt = end - start; s_i before ``start``, s_f after ``end``."""
    if step <= start:
        return initial
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


# ---------------------------------------------------------------------------------------
# Learning-rate schedules for retraining after a prune (IMP without rewinding, or after a
# one-shot prune). Sources: Renda, Frankle & Carbin, ICLR 2020 ("Comparing rewinding and
# fine-tuning in neural network pruning": FT, LRW); Le & Hua, ICLR 2021 ("Network pruning
# that matters: a case study on retraining variants": SLR, CLR); Zimmer, Spiegel & Pokutta,
# ICLR 2023 ("How I learned to stop worrying and love retraining": ALLR, and the common
# form used here: a warm-up over the first 10% of the retraining steps for SLR, CLR and
# ALLR, none for FT and LRW, as in the authors' code).
#
# Each is a torch.optim.lr_scheduler.LRScheduler: call ``scheduler.step()`` after every
# ``optimizer.step()``. With t the number of ``step()`` calls so far (0 before the first)
# the rate is a closed form lr(t), set on every param group; past ``total_steps`` it stays
# at lr(total_steps).


def _rate(name: str, value: object, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)) \
            or float(value) < 0 or (positive and float(value) == 0):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} finite number, got {value!r}")
    return float(value)


def _original(name: str, lrs: object) -> list[float]:
    if isinstance(lrs, (str, bytes)) or not isinstance(lrs, Sequence) or len(lrs) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of per-step learning rates, got {type(lrs).__name__}")
    return [_rate(f"{name}[{i}]", v) for i, v in enumerate(lrs)]


def lr_trace(make_scheduler: Callable, steps: int, lr: float) -> list[float]:
    """The per-step learning rates a schedule gives over ``steps`` optimizer steps: the
    ``original_lrs`` LRW and SLR replay. ``make_scheduler(optimizer)`` builds the original
    schedule on an optimizer whose rate starts at ``lr`` (a one-parameter SGD; nothing is
    trained). Entry i is the rate optimizer step i + 1 used."""
    steps = check_int("steps", steps)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=_rate("lr", lr, positive=True))
    sched = make_scheduler(opt)
    out = []
    for _ in range(steps):
        out.append(float(opt.param_groups[0]["lr"]))
        opt.step()  # no gradient: nothing moves, but the scheduler sees a step taken
        if sched is not None:
            sched.step()
    return out


class _RetrainSchedule(LRScheduler):
    """An LRScheduler whose rate is ``lr_at(t)``, the same for every param group."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float,
                 target: float) -> None:
        self.total_steps = check_int("total_steps", total_steps)
        if isinstance(warmup_fraction, bool) or not isinstance(warmup_fraction, (int, float)) \
                or not 0.0 <= float(warmup_fraction) < 1.0:
            raise ValueError(f"warmup_fraction must be a number in [0, 1), got {warmup_fraction!r}")
        # Warm-up steps W = int(fraction * T), as the authors' code rounds them.
        self.warmup_steps = int(float(warmup_fraction) * self.total_steps)
        self.target = target  # the rate reached at the end of the warm-up
        super().__init__(optimizer)

    def lr_at(self, t: int) -> float:
        t = min(max(t, 0), self.total_steps)
        w = self.warmup_steps
        if t < w:
            # Cosine warm-up from 0 to the target: target * (1 - cos(pi t / W)) / 2.
            return self.target * (1.0 - math.cos(math.pi * t / w)) / 2.0
        return self.after_warmup(t - w, self.total_steps - w)

    def after_warmup(self, t: int, length: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch) for _ in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


class FT(_RetrainSchedule):
    """Fine-tuning (Han et al. 2015, as named by Renda, Frankle & Carbin, ICLR 2020):
    the last learning rate of the original training, constant: lr(t) = ``final_lr``.

    Args:
        optimizer: the retraining optimizer.
        final_lr: the rate the original training ended with (after any warm-up).
        total_steps: retraining length in optimizer steps.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, final_lr: float, total_steps: int) -> None:
        self.final_lr = _rate("final_lr", final_lr)
        super().__init__(optimizer, total_steps, 0.0, self.final_lr)

    def after_warmup(self, t: int, length: int) -> float:
        return self.final_lr


class LRW(_RetrainSchedule):
    """Learning-rate rewinding (Renda, Frankle & Carbin, ICLR 2020): retrain for T steps
    with the last T rates of the original schedule: lr(t) = original[N - T + t] for the
    original's N per-step rates (its first rate where T > N), no warm-up.

    Args:
        original_lrs: per-step rates of the original training (e.g. from :func:`lr_trace`).
        total_steps: T.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, original_lrs: Sequence[float], total_steps: int) -> None:
        self.original_lrs = _original("original_lrs", original_lrs)
        super().__init__(optimizer, total_steps, 0.0, self.original_lrs[0])

    def after_warmup(self, t: int, length: int) -> float:
        n = len(self.original_lrs)
        return self.original_lrs[min(n - 1, max(0, n - length + t))]


class SLR(_RetrainSchedule):
    """Scaled learning-rate restarting (Le & Hua, ICLR 2021): the whole original schedule
    compressed into the retraining budget. After a cosine warm-up over W = int(0.1 T)
    steps to max(original), lr(W + j) = original[floor(j N / (T - W))] for j < T - W
    (N = len(original_lrs), the original's per-step rates after its own warm-up).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, original_lrs: Sequence[float], total_steps: int,
                 warmup_fraction: float = 0.1) -> None:
        self.original_lrs = _original("original_lrs", original_lrs)
        super().__init__(optimizer, total_steps, warmup_fraction, max(self.original_lrs))

    def after_warmup(self, t: int, length: int) -> float:
        n = len(self.original_lrs)
        return self.original_lrs[min(n - 1, (t * n) // length)] if length else self.original_lrs[-1]


class CLR(_RetrainSchedule):
    """Cyclic learning-rate restarting (Le & Hua, ICLR 2021): one cosine cycle from the
    original's largest rate down to its smallest. After a cosine warm-up over
    W = int(0.1 T) steps to ``max_lr``, lr(W + j) = min_lr + (max_lr - min_lr)
    (1 + cos(pi j / (T - W))) / 2.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_lr: float, min_lr: float = 0.0, total_steps: int,
                 warmup_fraction: float = 0.1) -> None:
        self.max_lr, self.min_lr = _rate("max_lr", max_lr, positive=True), _rate("min_lr", min_lr)
        if self.min_lr > self.max_lr:
            raise ValueError(f"min_lr ({min_lr}) must not exceed max_lr ({max_lr})")
        super().__init__(optimizer, total_steps, warmup_fraction, self.max_lr)

    def after_warmup(self, t: int, length: int) -> float:
        if not length:
            return self.min_lr
        return self.min_lr + (self.max_lr - self.min_lr) * (1.0 + math.cos(math.pi * t / length)) / 2.0


def allr_initial_lr(max_lr: float, relative_norm_drop: float, density: float, total_steps: int,
                    original_steps: int) -> float:
    """ALLR's rate after warm-up (Zimmer, Spiegel & Pokutta, ICLR 2023):
    clip(max_lr * d / sqrt(1 - density), min(T / T_orig, 1) * max_lr, max_lr), with d the
    relative L2 norm of the pruned weights ||w - w_pruned|| / ||w||. Pruning a fraction s
    of weights drawn at random removes about sqrt(s) of the norm, so d / sqrt(s) measures
    how much more (or less) than that the prune took; the lower bound keeps short
    retraining from starting too low."""
    max_lr = _rate("max_lr", max_lr, positive=True)
    d = _rate("relative_norm_drop", relative_norm_drop)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    t, t_orig = check_int("total_steps", total_steps), check_int("original_steps", original_steps)
    floor = min(t / t_orig, 1.0) * max_lr
    s = 1.0 - float(density)
    scaled = max_lr * d / math.sqrt(s) if s > 0 else max_lr
    return min(max(scaled, floor), max_lr)


class ALLR(_RetrainSchedule):
    """Adaptive linear learning-rate restarting (Zimmer, Spiegel & Pokutta, ICLR 2023):
    after a cosine warm-up over W = int(0.1 T) steps to the rate eta of
    :func:`allr_initial_lr`, a linear decay to zero: lr(W + j) = eta (1 - j / (T - W)).

    Args:
        max_lr: the largest rate of the original training.
        relative_norm_drop: ||pruned weights|| / ||weights before the prune||
            (``Round.relative_norm_drop`` of :class:`LotteryTicket`).
        density: fraction of weights kept after the prune, in (0, 1].
        total_steps: retraining length T; original_steps: the original training's length.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_lr: float, relative_norm_drop: float,
                 density: float, total_steps: int, original_steps: int, warmup_fraction: float = 0.1) -> None:
        self.initial_lr = allr_initial_lr(max_lr, relative_norm_drop, density, total_steps, original_steps)
        super().__init__(optimizer, total_steps, warmup_fraction, self.initial_lr)

    def after_warmup(self, t: int, length: int) -> float:
        return self.initial_lr * (1.0 - t / length) if length else 0.0
