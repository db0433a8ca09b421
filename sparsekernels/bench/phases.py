"""Per-phase training-step time of AC/DC against dense: ``sparsekernels bench --scenario phases``.

The wide MLP of :mod:`sparsekernels.bench.training` is trained twice on the same
teacher-student batches, dense and under :class:`~sparsekernels.methods.ACDC`; the two
steps of every iteration are timed back to back (so a slow moment of the machine hits
both), and each AC/DC step is labelled with the phase it ran in. Reported, as ratios
against the dense step of the same run:

* compressed (C) phases: dense step time / C step time (target >= 3x at 90% sparsity);
* decompressed (D) phases: D step time / dense step time (target <= 1.1: a layer grown to
  density 1 runs a dense matmul on its values);
* every phase switch (re-compression to the target, or growth to density 1): its time in
  dense steps (target < 2).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..methods import ACDC
from . import harness
from .training import mlp, teacher_student_batches

TARGETS = {"compressed_speedup": 3.0, "decompressed_slowdown": 1.1, "switch_dense_steps": 2.0}


def acdc_layout(phase_steps: int, pairs: int) -> dict:
    """An AC/DC schedule of whole phases: a dense warm-up of one phase, ``pairs`` C/D pairs,
    a final C phase; ``total_steps`` = (2 * pairs + 2) * ``phase_steps``."""
    total = (2 * pairs + 2) * phase_steps
    return {"total_steps": total, "warmup": phase_steps, "phase_length": phase_steps,
            "dense_end": total - phase_steps}


def run(*, hidden: int = 4096, in_dim: int = 1024, out_dim: int = 256, batch: int = 256, phase_steps: int = 5,
        pairs: int = 2, sparsity: float = 0.9, seed: int = 0, progress=None) -> dict:
    """Times dense and AC/DC steps interleaved; returns the JSON payload (see module doc).

    Shapes: MLP in_dim-hidden-hidden-out_dim, fp32, Adam, ``batch`` rows per step.
    ``progress(done, total)`` is called after every iteration."""
    if phase_steps < 2:
        raise ValueError(f"phase_steps must be >= 2 (the first step after a switch is not counted), got {phase_steps}")
    layout = acdc_layout(phase_steps, pairs)
    total = layout["total_steps"]
    sizes = [in_dim, hidden, hidden, out_dim]
    dense, sparse = mlp(sizes, seed), mlp(sizes, seed)
    opt_dense = torch.optim.Adam(dense.parameters(), lr=1e-3)
    opt_sparse = torch.optim.Adam(sparse.parameters(), lr=1e-3)
    method = ACDC(sparse, opt_sparse, sparsity=sparsity, seed=seed, **layout)

    # Time each phase switch where it happens: inside the optimizer's step post-hook.
    switches: list[dict] = []
    update = method.update

    def timed_update(step: int) -> dict:
        t0 = time.perf_counter()
        record = update(step)
        switches.append({"step": step, "entered": record["phase"], "seconds": time.perf_counter() - t0})
        return record

    method.update = timed_update

    def step(model, opt, x, y) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    rows = []
    for i, (x, y) in enumerate(teacher_student_batches(in_dim, out_dim, batch, total, seed)):
        phase = method.phase
        n_switch = len(switches)
        t_dense = step(dense, opt_dense, x, y)
        t_acdc = step(sparse, opt_sparse, x, y)
        switch_s = sum(s["seconds"] for s in switches[n_switch:])
        # The first step of a phase pays one-off costs (first call on a new pattern, the
        # measured dispatch of a new density class): kept in the JSON, left out of medians.
        first = i == 0 or any(s["step"] == i for s in switches)
        rows.append({"step": i + 1, "phase": phase, "dense_s": t_dense, "acdc_s": t_acdc - switch_s,
                     "switch_s": switch_s, "first_of_phase": first})
        if progress is not None:
            progress(i + 1, total)

    dense_median = statistics.median(r["dense_s"] for r in rows)
    summary = {}
    for phase in ("sparse", "dense"):
        sel = [r for r in rows if r["phase"] == phase and not r["first_of_phase"]]
        summary[phase] = {"steps": len(sel), "median_step_s": statistics.median(r["acdc_s"] for r in sel),
                          "dense_median_step_s": statistics.median(r["dense_s"] for r in sel),
                          # per-iteration ratios: each AC/DC step against the dense step next to it
                          "speedup_vs_dense": statistics.median(r["dense_s"] / r["acdc_s"] for r in sel)}
    for s in switches:
        s["dense_steps"] = s["seconds"] / dense_median
    compressed = summary["sparse"]["speedup_vs_dense"]
    slowdown = 1.0 / summary["dense"]["speedup_vs_dense"]
    worst_switch = max(s["dense_steps"] for s in switches)
    targets = [
        {"target": f"compressed phase at {sparsity:.0%}: x dense", "value": compressed,
         "goal": f">= {TARGETS['compressed_speedup']}", "met": compressed >= TARGETS["compressed_speedup"]},
        {"target": "decompressed phase: time / dense", "value": slowdown,
         "goal": f"<= {TARGETS['decompressed_slowdown']}", "met": slowdown <= TARGETS["decompressed_slowdown"]},
        {"target": "slowest phase switch: dense steps", "value": worst_switch,
         "goal": f"< {TARGETS['switch_dense_steps']}", "met": worst_switch < TARGETS["switch_dense_steps"]},
    ]
    return {"benchmark": "acdc_phases", "machine": harness.machine_info("cpu"),
            "config": {"sizes": sizes, "batch": batch, "dtype": "float32", "optimizer": "Adam", "sparsity": sparsity,
                       "distribution": "global", "seed": seed, **layout},
            "dense_median_step_s": dense_median, "phases": summary, "switches": switches, "steps": rows,
            "targets": targets}


def default_path() -> str:
    return harness.result_path("phases", "cpu")


def plot(payload: dict, path: str) -> str:
    """Per-step wall-clock of dense and AC/DC (coloured by phase), switches marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = payload["steps"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([r["step"] for r in steps], [r["dense_s"] * 1e3 for r in steps], color="grey", label="dense")
    for phase, color in (("dense", "tab:orange"), ("sparse", "tab:blue")):
        sel = [r for r in steps if r["phase"] == phase]
        ax.scatter([r["step"] for r in sel], [r["acdc_s"] * 1e3 for r in sel], color=color, s=14,
                   label=f"AC/DC {'decompressed' if phase == 'dense' else 'compressed'} step")
    for s in payload["switches"]:
        ax.axvline(s["step"] + 0.5, color="tab:red", alpha=0.3)
        ax.annotate(f"{s['dense_steps']:.2f}", (s["step"] + 0.5, ax.get_ylim()[1]), fontsize=7, color="tab:red",
                    ha="center", va="top")
    sizes = payload["config"]["sizes"]
    ax.set_title(f"AC/DC step time by phase, MLP {'-'.join(map(str, sizes))}, "
                 f"{payload['config']['sparsity']:.0%} ({payload['machine']['cpu'][:40]})", fontsize=9)
    ax.set_xlabel("step (red lines: phase switches, cost in dense steps)")
    ax.set_ylabel("ms / step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
