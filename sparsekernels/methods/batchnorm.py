"""BatchNorm statistics recomputed on data: after weights change outside training
(one-shot pruning, averaging tickets), the running mean / variance no longer describe the
activations the layers see, and evaluation-mode outputs drift."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .._checks import check_int


def _inputs(batch):
    """The model input of a loader item: the item itself, or the first element of a
    (inputs, targets, ...) tuple / list."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Iterable, num_batches: int | None = None) -> int:
    """Recomputes every BatchNorm layer's running statistics from ``loader``.

    The statistics are reset and accumulated as an equal-weight average over the batches
    (``momentum=None`` while recalibrating), as SWA's ``update_bn`` does; the model's
    train / eval modes and the layers' momenta are restored afterwards.

    Args:
        model: any module; a model without BatchNorm is left alone.
        loader: iterable of inputs or of (inputs, targets, ...) tuples; inputs go to
            ``model(inputs)`` as they are.
        num_batches: use at most this many batches (all by default).
    Returns:
        The number of batches seen (0 when the model has no BatchNorm layer).
    Raises:
        ValueError: ``num_batches`` not a positive int, or an empty loader for a model
        with BatchNorm layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"recalibrate_batchnorm: model must be an nn.Module, got {type(model).__name__}")
    check_int("num_batches", num_batches, "recalibrate_batchnorm", allow_none=True)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    # The statistics as they were: put back if the loader is empty or a forward fails, so a
    # failed recalibration does not leave them reset to 0 / 1.
    saved = {m: {k: v.clone() for k, v in m.state_dict().items()} for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch weighs the same
    model.train()
    seen = 0
    try:
        for batch in loader:
            if num_batches is not None and seen >= num_batches:
                break
            model(_inputs(batch))
            seen += 1
        if seen == 0:
            raise ValueError("recalibrate_batchnorm: loader yielded no batch")
    except BaseException:
        for m, state in saved.items():
            m.load_state_dict(state)
        raise
    finally:
        for m, mode in modes.items():
            m.training = mode
        for m, momentum in momenta.items():
            m.momentum = momentum
    return seen
