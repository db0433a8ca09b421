"""The calibration loss SPDY's search ranks candidate plans by.

A plan's score is the loss of the model with the plan's pruned weights stitched in (from
:class:`~.database.PrunedWeights`), over the calibration batches, without retraining
(Frantar & Alistarh, "SPDY: Accurate Pruning with Speedup Guarantees", ICML 2022, where it
is the calibration loss after layer-wise reconstruction). By default the loss is the mean
squared error of the model's output against the dense model's output on the same batch,
averaged over batches; with ``loss_fn`` it is ``loss_fn(output, target)`` averaged over
``(inputs, targets, ...)`` batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..oneshot.calibration import batch_call


def output_tensor(out: object) -> Tensor:
    """The tensor a model's output stands for: itself, the ``logits`` of a dict-like output
    (transformers' ModelOutput), else its first tensor; the first element of a tuple / list."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        if "logits" in out:
            return out["logits"]
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out:
        return output_tensor(out[0])
    raise TypeError(f"spdy: cannot take a tensor from the model's output of type {type(out).__name__}; pass "
                    "loss_fn(output, target) to score it")


class CalibrationLoss:
    """``loss(weights)``: the calibration loss with ``weights`` (name -> weight tensor, of
    the named layers' weight shapes) swapped into ``model`` for the duration of the call.

    Args:
        model: the dense model; its weights are restored after every call.
        layers: name -> module of the prunable layers.
        batches: calibration batches (see ``oneshot.calibration.batch_call``).
        loss_fn: None (MSE against the dense outputs, computed once here) or
            ``loss_fn(output, target)`` with target the batch's second element.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], batches: list,
                 loss_fn: Callable | None = None) -> None:
        self.model, self.layers, self.batches, self.loss_fn = model, layers, batches, loss_fn
        if loss_fn is not None:
            if not callable(loss_fn):
                raise TypeError(f"spdy: loss_fn must be callable loss_fn(output, target), got {loss_fn!r}")
            if not all(isinstance(b, (tuple, list)) and len(b) >= 2 for b in batches):
                raise TypeError("spdy: with loss_fn the loader must yield (inputs, targets, ...) tuples")
            self.reference = None
        else:
            self.reference = [output_tensor(self._forward(b)).detach().float() for b in batches]

    @torch.no_grad()
    def _forward(self, batch) -> object:
        args, kwargs = batch_call(batch)
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def __call__(self, weights: Mapping[str, Tensor]) -> float:
        saved = {}
        try:
            for name, w in weights.items():
                param = self.layers[name].weight
                saved[name] = param.data
                param.data = w
            total = 0.0
            for k, batch in enumerate(self.batches):
                out = self._forward(batch)
                if self.loss_fn is None:
                    total += float(F.mse_loss(output_tensor(out).float(), self.reference[k]))
                else:
                    total += float(self.loss_fn(out, batch[1]))
            return total / len(self.batches)
        finally:
            for name, data in saved.items():
                self.layers[name].weight.data = data
