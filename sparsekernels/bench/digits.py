"""The digits task the demo, the benchmark scenarios and their tests train on: sklearn's
8x8 handwritten digits (1797 images, 10 classes), bundled with scikit-learn, so nothing is
downloaded."""

from __future__ import annotations

import torch


def digits(seed: int = 0, cnn: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], a quarter held out
    (split by a permutation from ``seed``). x: [N, 64] float32, or [N, 1, 8, 8] with
    ``cnn``; y: [N] int64 in [0, 10). 1348 training and 449 test images."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    if cnn:
        x = x.reshape(-1, 1, 8, 8)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 4
    return x[perm[n_test:]], y[perm[n_test:]], x[perm[:n_test]], y[perm[:n_test]]
