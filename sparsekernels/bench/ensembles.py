"""The ``ensembles`` benchmark scenario and its digits task (also used by the tests of
the ensemble methods): sklearn's 8x8 digits, a small MLP and a small CNN with BatchNorm."""

from __future__ import annotations

import torch
from torch import nn


def digits(seed: int = 0, cnn: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) of sklearn's digits, pixels scaled to [0, 1],
    a quarter held out (split by ``seed``). x: [N, 64] float32, or [N, 1, 8, 8] with
    ``cnn``; y: [N] int64 in [0, 10)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    if cnn:
        x = x.reshape(-1, 1, 8, 8)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 4
    return x[perm[n_test:]], y[perm[n_test:]], x[perm[:n_test]], y[perm[:n_test]]


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
