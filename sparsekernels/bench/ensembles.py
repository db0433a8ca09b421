"""The ``ensembles`` benchmark scenario and its digits task (also used by the tests of
the ensemble methods): sklearn's 8x8 digits, a small MLP and a small CNN with BatchNorm."""

from __future__ import annotations

import torch
from torch import nn

from .digits import digits


def digits_mlp(hidden: int = 128) -> nn.Sequential:
    """64 -> hidden -> hidden -> 10 with ReLU."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def digits_cnn(channels: int = 16) -> nn.Sequential:
    """[N, 1, 8, 8] -> conv3x3(c) BN ReLU -> conv3x3(2c, stride 2) BN ReLU -> linear 10."""
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.BatchNorm2d(2 * channels),
                         nn.ReLU(), nn.Flatten(), nn.Linear(2 * channels * 16, 10))


def batches(x: torch.Tensor, y: torch.Tensor, batch: int, epochs: int, seed: int = 0):
    """``epochs`` shuffled passes over (x, y) in batches of ``batch`` (the last one of an
    epoch may be smaller); the same ``seed`` gives the same order."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            yield x[idx], y[idx]


def steps_per_epoch(n: int, batch: int) -> int:
    return (n + batch - 1) // batch


def train(model: nn.Module, optimizer, data, closure_step: bool = False) -> int:
    """Cross-entropy training over the (inputs, targets) iterable ``data``; returns the
    number of optimizer steps. ``closure_step``: call ``optimizer.step(closure)`` (SAM-style
    optimizers such as CrAM)."""
    model.train()
    steps = 0
    for x, y in data:
        if closure_step:
            def closure(x=x, y=y):
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            optimizer.step(closure)
        else:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        steps += 1
    return steps


@torch.no_grad()
def probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(model(x)) [N, C] in eval mode (the model's mode is restored)."""
    mode = model.training
    model.eval()
    try:
        return torch.softmax(model(x), dim=-1)
    finally:
        model.train(mode)


# --------------------------------------------------------------------------- the scenario
def _timed_training(model: nn.Module, optimizer, data, closure_step: bool = False) -> list[float]:
    """Trains over ``data``; returns the wall-clock seconds of every step."""
    import time

    times = []
    model.train()
    for x, y in data:
        t0 = time.perf_counter()
        train(model, optimizer, [(x, y)], closure_step=closure_step)
        times.append(time.perf_counter() - t0)
    return times


def _ensemble_curve(template: nn.Module, tickets: list[dict], x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Metrics of the ensemble of the first k tickets, k = 1..M, plus the disagreement."""
    from ..ensemble import Ensemble

    curve = []
    for k in range(1, len(tickets) + 1):
        report = Ensemble.from_tickets(template, tickets[:k]).evaluate(x, y)
        curve.append({"tickets": k, **report["ensemble"], "disagreement": report["disagreement"]})
    return curve


def _timing(times: list[float]) -> dict:
    import statistics

    return {"steps": len(times), "median_step_ms": statistics.median(times) * 1e3,
            "mean_step_ms": statistics.fmean(times) * 1e3, "total_s": sum(times)}


def run(*, hidden: int = 256, epochs: int = 30, tickets: int = 3, sparsity: float = 0.9, batch: int = 64,
        lr: float = 0.01, update_interval: int = 20, seed: int = 0, progress=None) -> dict:
    """Digits MLP (64-hidden-hidden-10), Adam: one dense run, one EDST run of the same
    number of steps (``tickets`` tickets), and a DST ensemble of ``tickets`` RigL runs of
    that length each. Returns per-step and total times of each, the accuracy / NLL / ECE
    of the ensembles of the first k tickets (k = 1..M), and the cost of a CrAM+ step
    relative to its base optimizer (two forward / backward passes per step).

    ``progress(description)`` is called after each stage."""
    from ..ensemble import metrics
    from ..methods import EDST, CrAM, DSTEnsemble

    say = progress or (lambda _: None)
    xtr, ytr, xte, yte = digits(seed)
    total = epochs * steps_per_epoch(len(ytr), batch)
    data = list(batches(xtr, ytr, batch, epochs, seed=seed + 1))
    out: dict = {"config": {"hidden": hidden, "epochs": epochs, "tickets": tickets, "sparsity": sparsity,
                            "batch": batch, "lr": lr, "update_interval": update_interval, "steps": total}}

    torch.manual_seed(seed)
    dense = digits_mlp(hidden)
    opt = torch.optim.Adam(dense.parameters(), lr=lr)
    out["dense"] = {**_timing(_timed_training(dense, opt, data)), **metrics(probabilities(dense, xte), yte)}
    say("dense")

    torch.manual_seed(seed)
    model = digits_mlp(hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    edst = EDST(model, opt, sparsity=sparsity, total_steps=total, tickets=tickets, update_interval=update_interval,
                seed=seed)
    out["edst"] = {**_timing(_timed_training(model, opt, data)),
                   "curve": _ensemble_curve(model, edst.tickets, xte, yte)}
    assert edst.step == total == out["dense"]["steps"]  # EDST's budget is one dense run's
    say("edst")

    dst = DSTEnsemble(lambda: digits_mlp(hidden), lambda p: torch.optim.Adam(p, lr=lr), members=tickets,
                      sparsity=sparsity, total_steps=total, update_interval=update_interval, seed=seed)
    times = []
    for member, member_opt, _ in dst.runs:
        times += _timed_training(member, member_opt, data)
    out["dst_ensemble"] = {**_timing(times), "curve": _ensemble_curve(dst.runs[0][0], dst.tickets, xte, yte)}
    say("dst ensemble")

    steps = data[:max(5, min(len(data), 50))]
    torch.manual_seed(seed)
    base_model = digits_mlp(hidden)
    base_t = _timed_training(base_model, torch.optim.SGD(base_model.parameters(), lr=0.05, momentum=0.9), steps)
    torch.manual_seed(seed)
    cram_model = digits_mlp(hidden)
    cram = CrAM(torch.optim.SGD(cram_model.parameters(), lr=0.05, momentum=0.9), cram_model)
    cram_t = _timed_training(cram_model, cram, steps, closure_step=True)
    out["cram"] = {"sgd": _timing(base_t), "cram": _timing(cram_t)}
    out["cram"]["step_cost_vs_base"] = out["cram"]["cram"]["median_step_ms"] / out["cram"]["sgd"]["median_step_ms"]
    say("cram")
    return out


def plot(payload: dict, path: str) -> str:
    """Ensemble accuracy / NLL / ECE vs number of tickets (EDST and the DST ensemble,
    the dense run as a line) as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, label in zip(axes, ("accuracy", "nll", "ece"), ("test accuracy", "test NLL", "test ECE (15 bins)")):
        for name, style in (("edst", "o-"), ("dst_ensemble", "s--")):
            curve = payload[name]["curve"]
            ax.plot([c["tickets"] for c in curve], [c[key] for c in curve], style, label=name.replace("_", " "))
        ax.axhline(payload["dense"][key], color="grey", linestyle=":", label="dense")
        ax.set_xlabel("tickets in the ensemble")
        ax.set_title(label)
        ax.set_xticks([c["tickets"] for c in payload["edst"]["curve"]])
    axes[0].legend()
    cfg = payload["config"]
    fig.suptitle(f"digits MLP 64-{cfg['hidden']}-{cfg['hidden']}-10 at sparsity {cfg['sparsity']}, "
                 f"{cfg['steps']} steps per run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
