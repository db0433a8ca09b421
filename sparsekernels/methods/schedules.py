"""Schedules of the sparse-training methods (pure functions of the step)."""

from __future__ import annotations

import math


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
