"""The digits task of the dense <-> sparse method tests (AC/DC, GaP): sklearn's 8x8
digits with a fixed stratified split, the MLP 64-512-512-10 and a small CNN, fixed-order
minibatches, so every run of a test sees the same steps."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


def digits(dtype=torch.float32):
    """sklearn's 8x8 digits, pixels / 16, a fixed stratified 75/25 split:
    (x_train [N, 64], y_train [N], x_test, y_test)."""
    d = load_digits()
    x = torch.tensor(d.data, dtype=dtype) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return xtr, ytr, xte, yte


def mlp(seed, hidden=512, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10)).to(dtype)


def cnn(seed, dtype=torch.float32, channels=(32, 64)):
    """Two 3x3 convolutions (SparseConv2d once a method attaches) and a linear head."""
    torch.manual_seed(seed)
    c1, c2 = channels
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(c2 * 16, 10)).to(dtype)


def batch_order(n, batch, epochs, seed=0):
    """Fixed-order minibatches: one seeded permutation per epoch, the last partial batch dropped."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        out += [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]
    return out


def run_steps(model, optimizer, data, order, scheduler=None):
    """One optimizer step per minibatch of ``order`` (cross-entropy on the training split)."""
    xtr, ytr = data[0], data[1]
    for idx in order:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


@torch.no_grad()
def accuracy(model, data):
    """Test accuracy in percent (eval mode for the pass, train mode restored)."""
    model.eval()
    acc = float((model(data[2]).argmax(1) == data[3]).float().mean()) * 100
    model.train()
    return acc
