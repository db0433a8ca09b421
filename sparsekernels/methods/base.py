"""What every sparse-training method shares: swapping the model's layers to sparse ones,
hooking the optimizer, counting steps, applying drop/grow plans, checkpointing."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..formats import check_sparsity, kept_count, random_mask
from ..nn import SparseConv2d, SparseLinear, eligible_layers, layer_sparsities
from ..topology import drop_smallest, update_layer

SPARSE_LAYERS = (SparseLinear, SparseConv2d)


def _check_positive_int(name: str, value: object, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0 \
            or math.isnan(float(value)):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def weight_shape(layer: nn.Module) -> tuple[int, ...]:
    """The logical dense weight shape of a sparse layer ([out, in] or [out, in/g, kh, kw])."""
    return tuple(layer.weight_shape) if isinstance(layer, SparseConv2d) else (layer.out_features, layer.in_features)


class SparseTrainingMethod:
    """Base class. Subclasses say when to update and how many weights move where.

    Constructing a method swaps the model's eligible dense layers for sparse ones (the
    optimizer is re-pointed at the new ``values`` parameters, keeping any state at the
    kept positions) and registers an optimizer step post-hook, so a plain loop, Lightning
    or the HF Trainer need no extra call. ``remove()`` detaches it.
    """

    name = "base"
    needs_gradient = False  # RigL-style growth scores from this step's x and dy

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, sparsity: float = 0.9,
                 distribution: str = "erk", update_interval: int = 100, seed: int = 0,
                 include=(nn.Linear, nn.Conv2d), exclude=()) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(self).__name__}: optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        self.sparsity = check_sparsity(sparsity)
        self.distribution = distribution
        self.update_interval = _check_positive_int("update_interval", update_interval)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.model, self.optimizer = model, optimizer
        self.step = 0
        self.history: list[dict] = []
        self.layers: dict[str, nn.Module] = {}
        self._attach_layers(include, exclude)
        self._hook = optimizer.register_step_post_hook(self._after_step)
        self._arm_capture()

    # ------------------------------------------------------------------ setup
    def initial_mask(self, name: str, weight: Tensor, sparsity: float, generator: torch.Generator) -> Tensor:
        """Mask a dense layer starts from (default: uniform random at ``sparsity``)."""
        return random_mask(tuple(weight.shape), sparsity, generator=generator).to(weight.device)

    def _attach_layers(self, include, exclude) -> None:
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        dense = eligible_layers(self.model, include, exclude)
        sparse = {n: m for n, m in self.model.named_modules() if isinstance(m, SPARSE_LAYERS)}
        if not dense and not sparse:
            raise ValueError(f"{type(self).__name__}: the model has no nn.Linear / nn.Conv2d layer to sparsify")
        for name, m in {**dense, **sparse}.items():
            p = m.values if isinstance(m, SPARSE_LAYERS) else m.weight
            if id(p) not in held:
                raise ValueError(f"{type(self).__name__}: the optimizer does not hold the weights of layer "
                                 f"'{name}'; build the optimizer on model.parameters() first")
        per_layer = layer_sparsities({n: tuple(m.weight.shape) for n, m in dense.items()}, self.sparsity,
                                     self.distribution)
        generator = torch.Generator().manual_seed(self.seed)
        for name, module in dense.items():
            mask = self.initial_mask(name, module.weight.detach(), per_layer[name], generator)
            sparse_cls = SparseConv2d if isinstance(module, nn.Conv2d) else SparseLinear
            new = sparse_cls.from_dense(module, mask=mask)
            if module.bias is not None:
                new.bias = module.bias  # same Parameter: the optimizer and its state stay valid
            self._swap_in_optimizer(module.weight, new.values, mask)
            self._replace(name, new)
        self.layers = {n: m for n, m in self.model.named_modules() if isinstance(m, SPARSE_LAYERS)}

    def _swap_in_optimizer(self, old: nn.Parameter, new: nn.Parameter, mask: Tensor) -> None:
        for group in self.optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = self.optimizer.state.pop(old, None)
        if state:
            flat_mask = mask.reshape(mask.shape[0], -1)
            self.optimizer.state[new] = {
                k: (v.reshape(flat_mask.shape)[flat_mask].clone() if isinstance(v, Tensor) and v.shape == old.shape else v)
                for k, v in state.items()}

    def _replace(self, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        if not child:
            raise ValueError(f"{type(self).__name__}: the model itself is a single layer; wrap it in a module")
        setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, new)

    # ------------------------------------------------------------------ schedule (subclasses)
    def is_update_step(self, step: int) -> bool:
        """Whether the update runs after optimizer step number ``step`` (1-based)."""
        return False

    def plan(self, step: int) -> dict[str, tuple[int, int]]:
        """Per layer (n_drop, n_grow) for the update at ``step``."""
        return {}

    def grow(self, name: str, layer: nn.Module, n: int, keep: Tensor, step: int, index: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(rows, cols, scores or None) of the ``n`` positions to activate."""
        raise NotImplementedError(f"{type(self).__name__} does not grow weights")

    # ------------------------------------------------------------------ the hook
    def _arm_capture(self) -> None:
        if self.needs_gradient:
            arm = self.is_update_step(self.step + 1)
            for layer in self.layers.values():
                layer.capture_next(arm)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.step += 1
        if self.is_update_step(self.step):
            self.update(self.step)
        self._arm_capture()

    @torch.no_grad()
    def update(self, step: int) -> dict:
        """Runs one topology update now and records it in ``history``."""
        record = {"step": step, "layers": {}}
        for index, (name, (n_drop, n_grow)) in enumerate(self.plan(step).items()):
            layer = self.layers[name]
            keep = drop_smallest(layer.values, n_drop)
            rows, cols, scores = self.grow(name, layer, n_grow, keep, step, index) if n_grow else (
                torch.empty(0, dtype=torch.long, device=keep.device),) * 2 + (None,)
            stats, _ = update_layer(layer, keep, rows, cols, [self.optimizer])
            record["layers"][name] = {
                "nnz": stats.nnz_after, "dropped": stats.dropped, "grown": stats.grown, "new": stats.new,
                "mean_grow_score": float(scores.float().mean()) if scores is not None and scores.numel() else None,
            }
        self.history.append(record)
        return record

    def remove(self) -> None:
        """Detaches from the optimizer; the layers stay sparse with their current masks."""
        self._hook.remove()
        for layer in self.layers.values():
            layer.capture_next(False)

    # ------------------------------------------------------------------ masks and checkpoints
    def masks(self) -> dict[str, Tensor]:
        """Boolean mask of every sparse layer, by module name."""
        return {n: m.mask() for n, m in self.layers.items()}

    def layer_nnz(self, name: str, sparsity: float) -> int:
        layer = self.layers[name]
        groups, rows, cols = layer.groups_layout
        return kept_count(groups * rows * cols, sparsity)

    def state_dict(self) -> dict:
        """Schedule position and history (the masks and values live in the model's
        state_dict, the moments in the optimizer's)."""
        return {"method": self.name, "step": self.step, "seed": self.seed, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != self.name:
            raise ValueError(f"{type(self).__name__}.load_state_dict: state is for method {state.get('method')!r}")
        self.step = int(state["step"])
        self.seed = int(state["seed"])
        self.history = list(state["history"])
        self.layers = {n: m for n, m in self.model.named_modules() if isinstance(m, SPARSE_LAYERS)}
        self._arm_capture()

    def named_layers(self) -> Iterable[tuple[str, nn.Module]]:
        return self.layers.items()
