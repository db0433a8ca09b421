"""Training-step timing: a wide MLP trained dense vs sparse (RigL, SET, static).

Used by ``sparsekernels demo`` (synthetic teacher-student task) and
``sparsekernels bench --scenario training``: the ratio printed is the median per-step
wall-clock of the dense model over that of the sparse one, measured in the same run.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..methods import SET, RigL, Static

METHODS = ("dense", "rigl", "set", "static")


def mlp(sizes: list[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def attach(method: str, model: nn.Module, optimizer, *, sparsity: float, update_interval: int, total_steps: int,
           seed: int):
    """Constructs the named method on ``model`` (None for dense)."""
    if method == "dense":
        return None
    if method == "rigl":
        return RigL(model, optimizer, sparsity=sparsity, update_interval=update_interval, total_steps=total_steps,
                    seed=seed)
    if method == "set":
        return SET(model, optimizer, sparsity=sparsity, update_interval=update_interval, seed=seed)
    if method == "static":
        return Static(model, optimizer, sparsity=sparsity, seed=seed)
    # Any other registered method (acdc, gap, ...) with its own defaults for the rest.
    from ..methods.registry import available_methods, get_method

    if method in available_methods():
        extra = {}
        if method == "gap":  # its default 4 groups need at least 4 layers; small MLPs have 3
            from ..nn import eligible_layers

            extra["partitions"] = min(4, max(1, len(eligible_layers(model))))
        return get_method(method)(model, optimizer, sparsity=sparsity, total_steps=total_steps, seed=seed, **extra)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS} or a registered method "
                     f"{available_methods()}")


def teacher_student_batches(in_dim: int, out_dim: int, batch: int, steps: int, seed: int):
    """A fixed random teacher MLP; inputs are Gaussian, targets the teacher's outputs."""
    teacher = mlp([in_dim, 256, out_dim], seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    for _ in range(steps):
        x = torch.randn(batch, in_dim, generator=g)
        with torch.no_grad():  # not around the yield: grad mode would leak into the caller
            y = teacher(x)
        yield x, y


class _TimedRun:
    """One method training the student, one timed step at a time (so that several runs can
    be interleaved step by step: drift of a shared machine then hits every method alike)."""

    def __init__(self, method: str, *, in_dim: int = 1024, hidden: int = 4096, out_dim: int = 256, depth: int = 2,
                 batch: int = 256, steps: int = 30, warmup: int = 3, sparsity: float = 0.9,
                 update_interval: int = 10, seed: int = 0):
        self.method, self.warmup = method, warmup
        self.model = mlp([in_dim] + [hidden] * depth + [out_dim], seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        total = warmup + steps
        # RigL stops updating at 75% of total_steps: stretch it so updates happen all
        # through the timed window.
        self.handle = attach(method, self.model, self.optimizer, sparsity=sparsity, update_interval=update_interval,
                             total_steps=int(total / 0.75) + 1, seed=seed)
        self.history = getattr(self.handle, "history", None)
        self.batches = enumerate(teacher_student_batches(in_dim, out_dim, batch, total, seed))
        self.times: list[float] = []
        self.losses: list[float] = []
        self.update_steps: list[int] = []

    def step(self) -> bool:
        """Runs the next step; False when all steps have run."""
        try:
            i, (x, y) = next(self.batches)
        except StopIteration:
            return False
        n_updates = len(self.history) if self.history is not None else 0
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        dt = time.perf_counter() - t0
        if i >= self.warmup:
            if self.history is not None and len(self.history) > n_updates:
                self.update_steps.append(len(self.times))  # this step ran a topology update
            self.times.append(dt)
        self.losses.append(float(loss.detach()))
        return True

    def result(self) -> dict:
        params = sum(p.numel() for p in self.model.parameters())
        return {"method": self.method, "step_s": self.times, "median_step_s": statistics.median(self.times),
                "mean_step_s": statistics.fmean(self.times), "losses": self.losses, "params": params,
                "updates": len(self.history) if self.history is not None else 0, "update_steps": self.update_steps}


def time_steps(method: str, **kwargs) -> dict:
    """Trains the student for ``warmup + steps`` steps (keywords of :class:`_TimedRun`);
    returns per-step seconds and losses.

    ``update_interval`` is small on purpose, so that topology updates (and their cost)
    happen inside the timed window."""
    run = _TimedRun(method, **kwargs)
    while run.step():
        pass
    return run.result()


def update_cost_in_dense_steps(result: dict, dense_median_s: float) -> float | None:
    """What one topology update adds to its step, in dense training steps of the same
    model: (mean time of the steps that ran an update - median of the others) / dense
    median step. None when no timed step ran an update."""
    upd = set(result.get("update_steps", []))
    if not upd:
        return None
    with_update = [t for i, t in enumerate(result["step_s"]) if i in upd]
    plain = [t for i, t in enumerate(result["step_s"]) if i not in upd] or with_update
    return (statistics.fmean(with_update) - statistics.median(plain)) / dense_median_s


def compare(methods=METHODS, progress=None, **kwargs) -> dict:
    """Per-step timing of each method on the same task, the methods' steps interleaved
    (one step of each in turn); ratios vs dense. ``progress(step_index)`` after each round."""
    runs = [_TimedRun(m, **kwargs) for m in methods]
    rounds = 0
    while any([run.step() for run in runs]):  # a list: every run steps in each round
        rounds += 1
        if progress is not None:
            progress(rounds)
    results = {run.method: run.result() for run in runs}
    dense = results.get("dense")
    for m, r in results.items():
        r["speedup_vs_dense"] = dense["median_step_s"] / r["median_step_s"] if dense else None
        # Mean: the wall-clock per step with the topology updates amortised in.
        r["mean_speedup_vs_dense"] = dense["mean_step_s"] / r["mean_step_s"] if dense else None
        r["update_cost_dense_steps"] = update_cost_in_dense_steps(r, dense["median_step_s"]) if dense else None
    return results
