"""The lottery-ticket curve on digits: test accuracy vs sparsity of IMP with rewinding,
against the same masks with re-initialised weights (Frankle & Carbin, ICLR 2019, Fig. 3's
"reinit" control).

``imp_curve(...)`` returns the numbers, ``plot_imp_curve(result, path)`` writes the PNG.
Data: scikit-learn's digits (8x8 images, 10 classes), a fixed 75/25 split; model: the
MLP 64-512-512-10 with ReLU; every run sees the same batches in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.lottery import LotteryTicket
from ..nn import SparseLinear
from .digits import digits
from .training import mlp


def train(model: nn.Module, optimizer, data, *, epochs: int, batch: int = 64, seed: int = 0, skip: int = 0,
          scheduler=None) -> int:
    """Cross-entropy training over ``epochs`` epochs in a fixed order (from ``seed``);
    the first ``skip`` steps are passed over (a run resumed inside a round). Returns the
    number of steps of the whole run."""
    xtr, ytr = data[0], data[1]
    g = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), batch):
            step += 1
            if step <= skip:
                continue
            idx = order[i:i + batch]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    return step


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    """Test accuracy in percent."""
    return float((model(data[2]).argmax(1) == data[3]).float().mean()) * 100


def reinit_with_mask(masks: dict[str, torch.Tensor], sizes: list[int], seed: int) -> nn.Module:
    """The MLP freshly initialised from ``seed`` (the dense init distribution), its linear
    layers made sparse with ``masks`` (name -> bool [out, in])."""
    model = mlp(sizes, seed)
    for name, mask in masks.items():
        setattr(model, name, SparseLinear.from_dense(model.get_submodule(name), mask=mask))
    return model


def imp_curve(*, rounds: int = 15, prune_fraction: float = 0.2, epochs: int = 4, lr: float = 1.2e-3,
              hidden: int = 512, seed: int = 0, reinit_rounds=None, scope: str = "global",
              criterion: str = "large_final", progress: bool = True) -> dict:
    """IMP with rewinding to theta_0 on digits, and the reinitialised control.

    Args:
        rounds, prune_fraction, scope, criterion: as :class:`LotteryTicket`.
        epochs: training epochs per round (Adam at ``lr``, batch 64).
        reinit_rounds: rounds whose mask is also trained from a fresh init (default all).
    Returns:
        ``{"sparsity": [...], "rewound": [...], "reinit": {round: acc}, "rounds": [...]}``,
        accuracies in percent per round.
    """
    from tqdm.auto import tqdm

    sizes = [64, hidden, hidden, 10]
    data = digits(seed)
    model = mlp(sizes, seed)
    lt = LotteryTicket(model, lambda p: torch.optim.Adam(p, lr=lr), prune_fraction=prune_fraction, rounds=rounds,
                       scope=scope, criterion=criterion, seed=seed)
    reinit_rounds = set(range(rounds) if reinit_rounds is None else reinit_rounds)
    out = {"rounds": [], "sparsity": [], "rewound": [], "reinit": {}}
    bar = tqdm(total=rounds, desc="IMP rounds", disable=not progress)
    for rnd in lt.rounds():
        train(rnd.model, rnd.optimizer, data, epochs=epochs, seed=seed + 1)
        out["rounds"].append(rnd.index)
        out["sparsity"].append(rnd.sparsity)
        out["rewound"].append(accuracy(rnd.model, data))
        if rnd.index in reinit_rounds:
            control = reinit_with_mask(lt.masks(), sizes, seed + 1000 + rnd.index)
            train(control, torch.optim.Adam(control.parameters(), lr=lr), data, epochs=epochs, seed=seed + 1)
            out["reinit"][rnd.index] = accuracy(control, data)
        bar.update(1)
        bar.set_postfix(sparsity=f"{rnd.sparsity:.3f}", acc=f"{out['rewound'][-1]:.1f}")
    bar.close()
    return out


def plot_imp_curve(result: dict, path: str) -> str:
    """Writes test accuracy vs sparsity (rewound vs reinitialised) as a PNG; returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    remaining = [100 * (1 - s) for s in result["sparsity"]]
    ax.plot(remaining, result["rewound"], "o-", label="IMP, rewound to init (ticket)")
    re = sorted(result["reinit"].items())
    ax.plot([remaining[r] for r, _ in re], [a for _, a in re], "s--", label="same mask, reinitialised")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("lottery tickets, digits MLP 64-512-512-10")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["imp_curve", "plot_imp_curve", "digits", "train", "accuracy", "reinit_with_mask"]
