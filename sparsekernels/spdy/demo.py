"""``sparsekernels spdy``: SPDY on a built-in model, with a table, a PNG and a JSON.

Models (random weights; the timing and the speed-up prediction are what is shown):

* ``mlp``: the 4096-wide MLP of the training benchmark (``bench.training.mlp``),
  width-width-width-width-width (4 Linear layers, ReLU between), batch 256;
* ``cnn``: a small CNN on 3x32x32 inputs (:func:`cnn`), batch 64.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..bench import harness
from ..bench.training import mlp
from .search import search

MODELS = ("mlp", "cnn")
DEFAULTS = {"mlp": {"width": 4096, "batch": 256, "target_speedup": 2.0},
            "cnn": {"width": 64, "batch": 64, "target_speedup": 1.3}}
MLP_LAYERS = 4


def cnn(channels: int = 64, hidden: int = 2048, classes: int = 10, seed: int = 0) -> nn.Sequential:
    """Conv(3→c/2, 3x3) → Conv(c/2→c, 3x3, stride 2) → Conv(c→c, 3x3, stride 2), ReLU after
    each, then Linear(c·8·8 → hidden) → ReLU → Linear(hidden → classes). Input [N, 3, 32, 32]."""
    torch.manual_seed(seed)
    half = max(1, channels // 2)
    return nn.Sequential(
        nn.Conv2d(3, half, 3, padding=1), nn.ReLU(),
        nn.Conv2d(half, channels, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(channels * 8 * 8, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def demo_model(kind: str, *, width: int | None = None, batch: int | None = None, batches: int = 2,
               seed: int = 0) -> tuple[nn.Module, list, str]:
    """(model, calibration batches of random inputs, description) for ``kind`` in
    :data:`MODELS`; ``width``: the MLP's width or the CNN's channels."""
    if kind not in MODELS:
        raise ValueError(f"spdy demo: model must be one of {MODELS}, got {kind!r}")
    width = width or DEFAULTS[kind]["width"]
    batch = batch or DEFAULTS[kind]["batch"]
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "mlp":
        model = mlp([width] * (MLP_LAYERS + 1), seed)
        data = [torch.randn(batch, width, generator=g) for _ in range(batches)]
        return model, data, f"MLP {'-'.join([str(width)] * (MLP_LAYERS + 1))}, batch {batch}"
    model = cnn(width, seed=seed)
    data = [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(batches)]
    return model, data, f"CNN ({width} channels, Linear head 2048), 3x32x32, batch {batch}"


def plot(result, path: str, title: str = "") -> str:
    """Two panels: planned sparsity per layer (bars, labelled; "dense" where the layer stays
    dense), and the forward time dense vs planned, predicted (stacked per layer + rest) and
    measured end to end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    db = result.timings
    names = db.names
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    ax1.bar(range(len(names)), [result.plan[n] for n in names], color="tab:blue")
    for k, n in enumerate(names):
        ax1.annotate(f"{result.plan[n]:.2f}" if result.plan[n] > 0 else "dense", (k, result.plan[n]), ha="center",
                     va="bottom", fontsize=7)
    ax1.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("planned sparsity")
    ax1.set_title(f"SPDY plan, target {result.target_speedup:.2f}x ({result.method})", fontsize=9)
    labels, bottoms = ["dense\n(predicted)", "planned\n(predicted)"], [0.0, 0.0]
    for k, n in enumerate(names):
        lt = db.layers[n]
        parts = (lt.dense_s * 1e3, lt.time(result.level_index[n]) * 1e3)
        ax2.bar([0, 1], parts, bottom=bottoms, color=f"C{k % 10}", label=n if k < 12 else None)
        bottoms = [b + p for b, p in zip(bottoms, parts)]
    ax2.bar([0, 1], [db.rest_s * 1e3] * 2, bottom=bottoms, color="black", alpha=0.3, label="rest")
    if result.measured is not None:
        labels += ["dense\n(measured)", "planned\n(measured)"]
        ax2.bar([2, 3], [result.measured["dense_s"] * 1e3, result.measured["other_s"] * 1e3], color="white",
                edgecolor="black", hatch="//", label="end to end")
    ax2.set_xticks(range(len(labels)), labels, fontsize=8)
    ax2.set_ylabel("ms / forward")
    measured = "" if result.measured_speedup is None else f", measured {result.measured_speedup:.2f}x"
    ax2.set_title(f"predicted {result.predicted_speedup:.2f}x{measured}", fontsize=9)
    ax2.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        fig.suptitle(f"{title} ({db.machine.get('cpu', '')[:40]}, {db.machine.get('threads', '?')} threads)",
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(kind: str = "mlp", *, target_speedup: float | None = None, levels: int = 40, method: str = "magnitude",
        search_steps: int = 30, repeats: int = 5, seed: int = 0, width: int | None = None,
        batch: int | None = None, out_dir: str = os.path.join("bench", "results"), make_plot: bool = True,
        progress: bool = True) -> dict:
    """Searches, applies and measures the plan on the demo model; writes
    ``spdy-<kind>-<device>-<CPU kind>-<time>.json`` (and ``.png`` where matplotlib is installed) into
    ``out_dir``. Returns ``{"result", "json", "png" (None without a plot), "description"}``."""
    model, data, description = demo_model(kind, width=width, batch=batch, seed=seed)
    target = target_speedup or DEFAULTS[kind]["target_speedup"]
    result = search(model, data, target_speedup=target, levels=levels, method=method, search_steps=search_steps,
                    repeats=repeats, seed=seed, apply=True, progress=progress)
    device = str(result.timings.machine.get("device", "cpu")).split(":")[0]
    stem = harness.result_path(f"spdy-{kind}", device, out_dir)[:-len(".json")]
    payload = {"benchmark": "spdy", "machine": result.timings.machine,
               "config": {"model": kind, "description": description, "target_speedup": target, "levels": levels,
                          "method": method, "search_steps": search_steps, "repeats": repeats, "seed": seed},
               "result": result.to_dict()}
    path = harness.write_json(stem + ".json", payload)
    png = None
    if make_plot:
        try:
            png = plot(result, stem + ".png", description)
        except ImportError:  # no matplotlib (the GPU machine's Python): JSON only
            png = None
    return {"result": result, "json": path, "png": png, "description": description}
