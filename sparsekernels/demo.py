"""``sparsekernels demo``: sparse-to-sparse training end to end.

Part 1, accuracy (scikit-learn's digits, 8x8 images, 10 classes): the same MLP trained
dense, with RigL, SET and a static mask at 90% sparsity (ERK), and with a masked-dense
RigL (dense weight x mask, dense gradient: the textbook formulation) for reference; same
seed, data order and epochs. Each run is a separate process so its peak memory is its own.

Part 2, speed (synthetic teacher-student regression, hidden width 4096): per-step
wall-clock of the sparse methods against the dense model in the same run.

Prints two tables and writes a PNG (accuracy vs step; time per step per method).
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import os
import resource
import time

import torch
from torch import nn

DIGITS_METHODS = ("dense", "rigl", "set", "static", "masked_rigl")
# Rows a user can add with --methods (not in the default demo, which stays a few minutes):
# the dense <-> sparse methods, and IMP (lottery tickets), whose rounds have their own plot.
EXTRA_METHODS = ("acdc", "gap", "imp")
# Optimizer steps between two topology updates of the digits rows.
DIGITS_UPDATE_INTERVAL = 100


def _state_bytes(model: nn.Module, optimizer) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


def train_digits(method: str, *, hidden: int = 512, epochs: int = 30, batch: int = 32, sparsity: float = 0.9,
                 update_interval: int = DIGITS_UPDATE_INTERVAL, lr: float = 1e-3, seed: int = 0,
                 eval_every: int = 50) -> dict:
    """Trains one method on digits; returns accuracy curve, time, memory and sizes."""
    from .bench.training import attach, mlp
    from .methods import RigL, MaskedDenseRigL

    torch.manual_seed(seed)
    from .bench.digits import digits

    xtr, ytr, xte, yte = digits(seed)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = mlp([64, hidden, hidden, 10], seed)
    steps_per_epoch = (len(ytr) + batch - 1) // batch
    total = epochs * steps_per_epoch
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if method == "masked_rigl":
        # Same initial masks as RigL: build RigL on a copy and take its masks.
        shadow = copy.deepcopy(model)
        shadow_opt = torch.optim.Adam(shadow.parameters(), lr=lr)
        rigl = RigL(shadow, shadow_opt, sparsity=sparsity, update_interval=update_interval, total_steps=total, seed=seed)
        handle = MaskedDenseRigL(model, optimizer, rigl.masks(), update_interval=update_interval, t_end=rigl.t_end)
        del shadow, shadow_opt, rigl
    else:
        handle = attach(method, model, optimizer, sparsity=sparsity, update_interval=update_interval,
                        total_steps=total, seed=seed)

    def accuracy() -> float:
        with torch.no_grad():
            return float((model(xte).argmax(1) == yte).float().mean()) * 100

    g = torch.Generator().manual_seed(seed + 7)
    curve, step, train_time = [(0, accuracy())], 0, 0.0
    for _ in range(epochs):
        order = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), batch):
            idx = order[i:i + batch]
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            optimizer.step()
            train_time += time.perf_counter() - t0
            step += 1
            if step % eval_every == 0:
                curve.append((step, accuracy()))
    curve.append((step, accuracy()))
    if method == "masked_rigl":
        trainable = sum(int(m.sum()) for m in handle.masks.values()) + sum(
            p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    else:
        trainable = sum(p.numel() for p in model.parameters())
    return {"method": method, "accuracy": curve[-1][1], "curve": curve, "train_s": train_time, "steps": step,
            "trainable": trainable, "state_bytes": _state_bytes(model, optimizer),
            "peak_rss_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024.0}


def imp_digits(*, hidden: int = 512, epochs: int = 30, sparsity: float = 0.9, seed: int = 0,
               out_dir: str = os.path.join("bench", "results")) -> dict:
    """IMP with rewinding (lottery tickets) on digits down to about ``sparsity``: rounds of
    20% (the paper's rate), each round ``max(2, epochs // rounds)`` epochs; the ticket's and
    the re-initialised mask's accuracy per round go to ``demo-imp.png``. Returns the
    demo's row (the last round's ticket) plus the curve."""
    import math

    from .bench.lottery_curve import imp_curve, plot_imp_curve

    rounds = max(2, 1 + math.ceil(math.log(1 - sparsity) / math.log(0.8))) if sparsity > 0 else 1
    per_round = max(2, epochs // rounds)
    t0 = time.perf_counter()
    curve = imp_curve(rounds=rounds, prune_fraction=0.2, epochs=per_round, hidden=hidden, seed=seed,
                      reinit_rounds=[rounds - 1], progress=False)
    train_s = time.perf_counter() - t0
    os.makedirs(out_dir, exist_ok=True)
    png = plot_imp_curve(curve, os.path.join(out_dir, "demo-imp.png"))
    steps_per_epoch = (1348 + 63) // 64
    last = len(curve["rounds"]) - 1
    return {"method": "imp", "accuracy": curve["rewound"][-1], "curve": [(steps_per_epoch * per_round * (i + 1), a)
                                                                         for i, a in enumerate(curve["rewound"])],
            "train_s": train_s, "steps": steps_per_epoch * per_round * rounds, "trainable": None,
            "state_bytes": None, "peak_rss_mib": None, "final_sparsity": curve["sparsity"][-1],
            "reinit_accuracy": curve["reinit"].get(last), "imp_plot": png}


def _isolated(fn, **kwargs):
    """Runs fn(**kwargs) in a fresh process (its peak RSS is its own)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, kwds=kwargs)


def _timing_worker(method: str, kwargs: dict) -> dict:
    from .bench.training import time_steps

    return time_steps(method, **kwargs)


def run(*, epochs: int = 30, hidden: int = 512, timing_steps: int = 20, timing_hidden: int = 4096,
        sparsity: float = 0.9, seed: int = 0, out_dir: str = os.path.join("bench", "results"), console=None,
        methods=DIGITS_METHODS) -> dict:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    methods = tuple(methods)
    unknown = [m for m in methods if m not in DIGITS_METHODS + EXTRA_METHODS]
    if unknown or not methods:
        raise ValueError(f"demo: methods must be a non-empty selection of {DIGITS_METHODS + EXTRA_METHODS}, "
                         f"got {list(methods)}")
    console = console or Console()
    digits, timing = {}, {}
    # timing_steps=0 leaves out the speed part (the digits rows alone).
    timing_methods = ("dense", "rigl", "set", "static") if timing_steps > 0 else ()
    with Progress(console=console) as progress:
        task = progress.add_task("digits", total=len(methods) + len(timing_methods))
        for m in methods:
            progress.update(task, description=f"digits: {m}")
            if m == "imp":
                digits[m] = _isolated(imp_digits, hidden=hidden, epochs=epochs, sparsity=sparsity, seed=seed,
                                      out_dir=out_dir)
            else:
                digits[m] = _isolated(train_digits, method=m, hidden=hidden, epochs=epochs, sparsity=sparsity,
                                      seed=seed)
            progress.advance(task)
        kw = {"hidden": timing_hidden, "steps": timing_steps, "sparsity": sparsity, "seed": seed}
        for m in timing_methods:
            progress.update(task, description=f"teacher-student {timing_hidden}-wide: {m}")
            timing[m] = _isolated(_timing_worker, method=m, kwargs=kw)
            progress.advance(task)
    for r in timing.values():
        r["speedup_vs_dense"] = timing["dense"]["median_step_s"] / r["median_step_s"]

    t1 = Table(title=f"digits MLP 64-{hidden}-{hidden}-10, {epochs} epochs, sparsity {sparsity} (ERK)")
    for col in ("method", "test acc %", "train s", "peak RSS MiB", "trainable params", "weights+optim MiB"):
        t1.add_column(col, justify="right")
    for m, r in digits.items():
        if m == "imp":  # rounds of dense-to-sparse pruning: no single model size to report
            label = f"imp ({100 * r['final_sparsity']:.1f}% sparse)"
            t1.add_row(label, f"{r['accuracy']:.2f}", f"{r['train_s']:.2f}", "-", "-", "-")
            continue
        t1.add_row(m, f"{r['accuracy']:.2f}", f"{r['train_s']:.2f}", f"{r['peak_rss_mib']:.1f}", f"{r['trainable']:,}",
                   f"{r['state_bytes'] / 2**20:.2f}")
    console.print(t1)
    short = [m for m in ("rigl", "set", "masked_rigl") if m in digits and digits[m]["steps"] < DIGITS_UPDATE_INTERVAL]
    if short:
        console.print(f"{', '.join(short)}: {digits[short[0]]['steps']} steps, fewer than the update interval "
                      f"({DIGITS_UPDATE_INTERVAL}): no topology update ran, so they trained their initial mask as "
                      "static does; more --epochs (or a run without --quick) shows the updates")
    if "imp" in digits:
        r = digits["imp"]
        console.print(f"IMP ticket at {100 * r['final_sparsity']:.1f}% sparsity: {r['accuracy']:.2f}% vs the same mask "
                      f"re-initialised: {r['reinit_accuracy']:.2f}% (curve: {r['imp_plot']})")
    if "rigl" in digits and "masked_rigl" in digits:
        gap = digits["rigl"]["accuracy"] - digits["masked_rigl"]["accuracy"]
        console.print(f"RigL (sparse kernels) vs masked-dense RigL accuracy: {gap:+.2f} points")
    if timing:
        _timing_table(console, timing, timing_hidden, timing_steps)

    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, "demo.png")
    plot(digits, timing, png)
    console.print(f"plot: {png}")
    return {"digits": digits, "timing": timing, "plot": png}


def _timing_table(console, timing: dict, timing_hidden: int, timing_steps: int) -> None:
    from rich.table import Table

    t2 = Table(title=f"teacher-student MLP 1024-{timing_hidden}-{timing_hidden}-256, batch 256, Adam: per-step time "
                     f"(median of {timing_steps})")
    for col in ("method", "ms / step", "x dense", "params", "final loss"):
        t2.add_column(col, justify="right")
    for m, r in timing.items():
        t2.add_row(m, f"{r['median_step_s'] * 1e3:.1f}", f"{r['speedup_vs_dense']:.2f}", f"{r['params']:,}",
                   f"{r['losses'][-1]:.4f}")
    console.print(t2)
    console.print(f"RigL per-step speed-up over dense at width {timing_hidden}: "
                  f"{timing['rigl']['speedup_vs_dense']:.2f}x")
    if not any(timing[m].get("updates") for m in ("rigl", "set") if m in timing):
        console.print(f"no topology update fell inside these {timing_steps} steps: rigl and set trained their "
                      "initial mask, as static does (same final loss); more --timing-steps shows the updates")


def plot(digits: dict, timing: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if timing else 1, figsize=(11 if timing else 6, 4), squeeze=False)
    a1 = axes[0][0]
    for m, r in digits.items():
        steps, acc = zip(*r["curve"])
        a1.plot(steps, acc, label=m, lw=1.5, ls="--" if m == "masked_rigl" else "-")
    a1.set_xlabel("training step")
    a1.set_ylabel("test accuracy (%)")
    a1.set_title("digits, 90% sparse (ERK) vs dense")
    a1.set_ylim(bottom=max(0, min(min(a for _, a in r["curve"][1:]) for r in digits.values()) - 5))
    a1.grid(alpha=0.3)
    a1.legend()
    if not timing:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
    a2 = axes[0][1]
    names = list(timing)
    ms = [timing[m]["median_step_s"] * 1e3 for m in names]
    bars = a2.bar(names, ms, color=["gray"] + ["tab:blue"] * (len(names) - 1))
    for b, m in zip(bars, names):
        a2.annotate(f"{timing[m]['speedup_vs_dense']:.1f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom")
    a2.set_ylabel("ms per training step")
    a2.set_title("teacher-student, hidden 4096, batch 256")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
