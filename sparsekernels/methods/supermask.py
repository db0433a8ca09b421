"""Supermasks (Zhou, Lan, Liu & Yosinski, "Deconstructing lottery tickets: zeros, signs,
and the supermask", NeurIPS 2019): masks that make an untrained network accurate.

* :func:`mask_initial_weights`: a ticket's mask applied to the untrained initial weights
  (the paper's Section 4), as a model of real sparse layers.
* :class:`LearnedSupermask`: the weights stay frozen at their initial values and a score
  per weight is trained instead (the paper's Section 5). The search keeps a dense score
  tensor per layer (it is a dense-to-sparse search); the network it returns,
  :meth:`LearnedSupermask.sparse_model`, is made of ``SparseLinear`` / ``SparseConv2d``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from ..formats import check_sparsity, kept_count
from ..nn import SparseConv2d, SparseLinear
from ..nn._conv1d import is_conv1d
from ..nn._module_swap import swap_module
from ..nn.sparsify import eligible_layers, left_dense_layers, sparse_class_for, warn_left_dense
from ..ops._functorch import tangents_possible
from .base import check_generator_state

_SPARSE = (SparseLinear, SparseConv2d)


def _dense_of(layer: nn.Module) -> nn.Module:
    """A dense layer holding ``layer``'s weights (itself if it is dense)."""
    return layer.to_dense() if isinstance(layer, _SPARSE) else layer


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ValueError("the model itself is a single layer; wrap it in a module")
    swap_module(root, name, new)


def mask_initial_weights(initial_model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``initial_model`` whose layers named in ``masks`` are sparse layers
    holding the initial weights at the mask's positions: Zhou et al.'s evaluation of a
    ticket's mask on the untrained network (its "supermask" accuracy).

    Args:
        initial_model: the network at initialisation (e.g. a ``copy.deepcopy`` taken before
            training, dense or already made of sparse layers).
        masks: module name -> bool mask of the dense weight's shape ([out, in] for linear
            layers, also transformers ``Conv1D``; [out, in/g, kh, kw] for convolutions),
            e.g. ``LotteryTicket.masks()``.
    Returns:
        A new model (``initial_model`` is not changed) with ``SparseLinear`` /
        ``SparseConv2d`` layers.
    """
    if not isinstance(initial_model, nn.Module):
        raise TypeError(f"mask_initial_weights: initial_model must be an nn.Module, got {type(initial_model).__name__}")
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError("mask_initial_weights: masks must be a non-empty mapping of module name -> bool mask")
    model = copy.deepcopy(initial_model)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in modules:
            raise ValueError(f"mask_initial_weights: masks names {name!r}, which is not a module of the model")
        dense = _dense_of(modules[name])
        cls = sparse_class_for(dense)
        if cls is None:
            raise ValueError(f"mask_initial_weights: {name!r} is a {type(dense).__name__}, not a layer with a sparse "
                             "twin (nn.Linear, nn.Conv2d, transformers Conv1D)")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask_initial_weights: the mask of {name!r} must be a bool tensor")
        _replace(model, name, cls.from_dense(dense, mask=mask.to(dense.weight.device)))
    return model


class _BernoulliSTE(torch.autograd.Function):
    """m ~ Bernoulli(p) forward; the gradient passes straight through to p (Zhou et al.'s
    straight-through estimator: d m / d p taken as 1)."""

    @staticmethod
    def forward(p: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.bernoulli(p, generator=generator)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass  # the straight-through rules need nothing saved

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _BernoulliSTEForwardMode(_BernoulliSTE):
    """_BernoulliSTE with its forward-mode rule, used only where tangents are possible:
    dynamo cannot trace a Function that defines ``jvp``."""

    @staticmethod
    def jvp(ctx, tp: Tensor, _generator):
        return tp  # straight through, as the backward


class _SupermaskLayer(nn.Module):
    """A dense layer with its weight (and bias) frozen and a trainable score per weight.

    Training forward: mask ~ Bernoulli(sigmoid(scores)), weight * mask. Evaluation
    forward: the final mask (:meth:`final_mask`), deterministic."""

    def __init__(self, layer: nn.Module, sparsity: float | None, score_init: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.conv = isinstance(layer, nn.Conv2d)
        self.layer = layer  # holds the frozen weight [out, in] / [out, in/g, kh, kw] and bias
        for p in layer.parameters():
            p.requires_grad_(False)
        self.scores = nn.Parameter(torch.full_like(layer.weight, score_init))
        self.sparsity = sparsity
        self.generator = generator  # shared by the layers: one stream in forward order

    def final_mask(self) -> Tensor:
        """Top ``(1 - sparsity)`` of the weights by score (ties: lower flat index first),
        or where sigmoid(score) > 1/2 (the Bernoulli's more likely value) when the
        sparsity is None."""
        scores = self.scores.detach()
        if self.sparsity is None:
            return scores > 0
        flat = scores.reshape(-1)
        keep = kept_count(flat.numel(), self.sparsity)
        mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        mask[torch.sort(flat, descending=True, stable=True).indices[:keep]] = True
        return mask.view(scores.shape)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            ste = _BernoulliSTEForwardMode if tangents_possible() else _BernoulliSTE
            mask = ste.apply(torch.sigmoid(self.scores), self.generator)
        else:
            mask = self.final_mask().to(self.scores.dtype)
        w = self.layer.weight * mask
        if self.conv:
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)


class LearnedSupermask:
    """Supermask training (Zhou, Lan, Liu & Yosinski, NeurIPS 2019, Section 5): the
    weights stay at their initial values; a score s per weight is trained through a mask
    sampled as Bernoulli(sigmoid(s)) at every forward, the gradient passed straight
    through the sampling to sigmoid(s). The final mask is taken by score.

    Args:
        model: the network at initialisation; its ``nn.Linear`` / ``nn.Conv2d`` layers are
            replaced in place by score-carrying layers and every parameter of the model is
            frozen (``requires_grad=False``): only the scores train.
        sparsity: None (default, as in the paper: the density is learned) keeps the
            weights where sigmoid(s) > 1/2, the more likely value of each weight's
            Bernoulli; a number in [0, 1) keeps the ``(1 - sparsity)`` highest-scored
            weights of each layer instead.
        score_init: initial score of every weight; default logit(1 - sparsity), so the
            sampled masks start at the target density (0 for ``sparsity=None``).
        seed: seeds the mask sampling (one generator, drawn from in forward order; a
            train-mode forward draws whether or not grad is enabled, as dropout does).
        include, exclude: which layers (as :func:`sparsify`).

    Resume: the scores are in ``model.state_dict()``; the sampling generator is in
    :meth:`state_dict` (save and load it too, for the run to continue bit-identically).

    Use: ``opt = torch.optim.Adam(sm.parameters(), lr=0.1)``; train ``sm.model``; then
    ``sm.sparse_model()`` is the network with real sparse layers.

    Shapes / dtypes: scores have the dense weight's shape and dtype.
    """

    def __init__(self, model: nn.Module, *, sparsity: float | None = None, score_init: float | None = None,
                 seed: int = 0, include=(nn.Linear, nn.Conv2d), exclude=()) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"LearnedSupermask: model must be an nn.Module, got {type(model).__name__}")
        self.sparsity = None if sparsity is None else check_sparsity(sparsity)
        if score_init is None:
            score_init = 0.0 if self.sparsity in (None, 0.0) else math.log((1 - self.sparsity) / self.sparsity)
        if isinstance(score_init, bool) or not isinstance(score_init, (int, float)) or not math.isfinite(score_init):
            raise ValueError(f"score_init must be a finite number, got {score_init!r}")
        check_int("seed", seed, minimum=None)
        self.model, self.generator, self.seed = model, torch.Generator().manual_seed(seed), seed
        dense = eligible_layers(model, include, exclude)
        warn_left_dense("LearnedSupermask", left_dense_layers(model, include, exclude), stacklevel=3)
        if not dense:
            raise ValueError("LearnedSupermask: the model has no dense nn.Linear / nn.Conv2d layer")
        for p in model.parameters():
            p.requires_grad_(False)
        self.layers: dict[str, _SupermaskLayer] = {}
        for name, layer in dense.items():
            if is_conv1d(layer):
                raise ValueError(f"LearnedSupermask: {name!r} is a transformers Conv1D; convert it to nn.Linear first")
            new = _SupermaskLayer(layer, self.sparsity, float(score_init), self.generator)
            _replace(model, name, new)
            self.layers[name] = new

    def state_dict(self) -> dict:
        """The sampling generator's state (the scores live in the model's state dict)."""
        return {"method": "supermask", "seed": self.seed, "sparsity": self.sparsity,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict` (ValueError on another method's state or a bad
        entry, TypeError on a non-mapping; nothing changes then)."""
        owner = "LearnedSupermask.load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"{owner}: state must be a dict from state_dict(), got {type(state).__name__}")
        if state.get("method") != "supermask":
            raise ValueError(f"{owner}: state is for method {state.get('method')!r}")
        if state.get("sparsity", self.sparsity) != self.sparsity:
            raise ValueError(f"{owner}: the state was saved with sparsity={state['sparsity']!r}, this search has "
                             f"{self.sparsity!r}")
        self.generator.set_state(check_generator_state(owner, state.get("generator")))

    def parameters(self) -> Iterator[nn.Parameter]:
        """The scores, one tensor per layer: what the optimizer trains."""
        return (layer.scores for layer in self.layers.values())

    def masks(self) -> dict[str, Tensor]:
        """The final mask of every layer (bool, dense weight shape), by name."""
        return {n: layer.final_mask() for n, layer in self.layers.items()}

    def sparse_model(self) -> nn.Module:
        """A new model, the searched one with each layer a ``SparseLinear`` /
        ``SparseConv2d`` holding the frozen initial weights at its final mask."""
        # The copy takes each score layer's sparse replacement from the memo, so neither
        # the scores nor the sampling generator are copied.
        memo = {}
        for layer in self.layers.values():
            sparse = SparseLinear.from_dense(layer.layer, mask=layer.final_mask()) if not layer.conv else \
                SparseConv2d.from_dense(layer.layer, mask=layer.final_mask())
            # The search froze the weights so that only the scores trained; the network it
            # hands out trains as any other (fine-tuning it is the usual next step).
            sparse.requires_grad_(True)
            sparse.train(self.model.training)
            memo[id(layer)] = sparse
        return copy.deepcopy(self.model, memo)
