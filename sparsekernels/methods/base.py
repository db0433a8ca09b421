"""What every sparse-training method shares: swapping the model's layers to sparse ones,
hooking the optimizer, counting steps, applying drop/grow plans, checkpointing."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..formats import check_sparsity, kept_count, random_mask
from ..nn import SparseConv2d, SparseLinear, eligible_layers, layer_sparsities
from ..nn.distribution import DISTRIBUTIONS
from ..nn._conv1d import is_conv1d
from ..nn._module_swap import swap_module
from ..nn.sparsify import left_dense_layers, linear_weight, warn_left_dense
from ..topology import drop_smallest, update_layer
from . import _adopted, _distributed

SPARSE_LAYERS = (SparseLinear, SparseConv2d)


def check_generator_state(owner: str, state: object) -> Tensor:
    """``state`` a ``torch.Generator`` state (what ``get_state()`` returns: a uint8 tensor
    the generator accepts), checked by loading it into a scratch generator; ValueError
    naming ``owner`` otherwise."""
    if not isinstance(state, Tensor) or state.dtype != torch.uint8:
        raise ValueError(f"{owner}: generator must be a torch.Generator state (a uint8 tensor), got "
                         f"{type(state).__name__}")
    try:
        torch.Generator().set_state(state)
    except RuntimeError as exc:
        raise ValueError(f"{owner}: generator is not a torch.Generator state ({exc})") from None
    return state


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0 \
            or math.isnan(float(value)):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def warn_if_never_updated(owner: str, update_interval: object, t_end: int | None) -> None:
    """Topology updates run every ``update_interval`` steps up to ``t_end``: one past it
    never runs, and the method trains a fixed pattern (almost always a configuration
    mistake, e.g. an interval meant for a longer run)."""
    if t_end is not None and isinstance(update_interval, int) and update_interval > t_end:
        warnings.warn(f"{owner}: update_interval ({update_interval}) is past t_end ({t_end}): the topology never "
                      "changes (the run trains a fixed pattern, as Static)", stacklevel=3)


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The real ``torch.optim.Optimizer`` under trainer wrappers: accelerate's
    ``AcceleratedOptimizer`` (the HF Trainer's) holds it in ``.optimizer``, Lightning's
    ``LightningOptimizer`` in ``._optimizer``. Such wrappers subclass ``Optimizer`` without
    running its ``__init__`` (no step hooks of their own), but their ``step()`` calls the
    inner optimizer's, so a hook registered on the inner one fires on every real step.

    Raises TypeError when no optimizer with working step hooks is found.
    """
    current = optimizer
    for _ in range(8):  # wrappers nest a few levels at most; a cycle must not hang
        if isinstance(current, torch.optim.Optimizer) and hasattr(current, "_optimizer_step_post_hooks"):
            return current
        inner = next((v for v in (getattr(current, "optimizer", None), getattr(current, "_optimizer", None))
                      if v is not None and v is not current), None)
        if inner is None:
            break
        current = inner
    raise TypeError(f"optimizer must be a torch.optim.Optimizer (or a wrapper holding one in .optimizer / "
                    f"._optimizer, as accelerate's and Lightning's do), got {type(optimizer).__name__}")


@contextlib.contextmanager
def restore_on_error(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Runs the block; if it raises, puts back the model's submodules and the optimizer's
    param_groups and state exactly as they were (the same objects), then re-raises.

    Attaching a method swaps layers and re-points the optimizer one layer at a time: a
    failure half-way (a layer the optimizer lacks, a bad argument found late, an error in
    ``from_dense``) must not leave a half-converted model behind.
    """
    children = [(m, dict(m._modules)) for m in model.modules()]
    groups = list(optimizer.param_groups)
    group_items = [(g, dict(g), list(g["params"]), g["params"]) for g in groups]
    state = dict(optimizer.state)
    state_items = [(s, dict(s)) for s in state.values() if isinstance(s, dict)]
    try:
        yield
    except BaseException:
        for m, saved in children:
            m._modules.clear()
            m._modules.update(saved)
        for g, saved, params, params_list in group_items:
            g.clear()
            g.update(saved)
            params_list[:] = params  # the original list object, with its original contents
            g["params"] = params_list
        optimizer.param_groups[:] = groups
        for s, saved in state_items:
            s.clear()
            s.update(saved)
        optimizer.state.clear()
        optimizer.state.update(state)
        raise


def weight_shape(layer: nn.Module) -> tuple[int, ...]:
    """The logical dense weight shape of a sparse layer ([out, in] or [out, in/g, kh, kw])."""
    return tuple(layer.weight_shape) if isinstance(layer, SparseConv2d) else (layer.out_features, layer.in_features)


class SparseTrainingMethod:
    """Base class. Subclasses say when to update and how many weights move where.

    Constructing a method swaps the model's eligible dense layers for sparse ones (the
    optimizer is re-pointed at the new ``values`` parameters, keeping any state at the
    kept positions) and registers an optimizer step post-hook, so a plain loop, Lightning
    or the HF Trainer need no extra call. ``remove()`` detaches it.

    ``optimizer`` may be a trainer's wrapper (accelerate's, Lightning's): the method hooks
    the optimizer inside (:func:`unwrap_optimizer`). If attaching fails at any point, the
    model's modules and the optimizer's param_groups and state are left exactly as they
    were. Every method takes ``total_steps`` (positive int or None: the length of training
    in optimizer steps); what it sets is said by each method.
    """

    name = "base"
    needs_gradient = False  # RigL-style growth scores from this step's x and dy
    # Attributes that fix the schedule: saved by state_dict() so a resumed run continues the
    # saved one (subclasses extend the tuple).
    schedule_keys: tuple[str, ...] = ("sparsity", "distribution", "update_interval", "total_steps")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, sparsity: float = 0.9,
                 distribution: str = "erk", update_interval: int = 100, seed: int = 0,
                 total_steps: int | None = None, include=(nn.Linear, nn.Conv2d), exclude=()) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: model must be an nn.Module, got {type(model).__name__}")
        try:
            optimizer = unwrap_optimizer(optimizer)
        except TypeError as e:
            raise TypeError(f"{type(self).__name__}: {e}") from None
        self.sparsity = check_sparsity(sparsity)
        self.distribution = distribution
        self.update_interval = check_int("update_interval", update_interval)
        self.total_steps = check_int("total_steps", total_steps, allow_none=True)
        check_int("seed", seed, minimum=None)
        self.seed = seed
        self.model, self.optimizer = model, optimizer
        self.step = 0
        self.history: list[dict] = []
        self.layers: dict[str, nn.Module] = {}
        _distributed.check_fsdp(self, model, include, exclude)  # sharded set-ups it cannot train: say so now
        adopted_names = {n for n, m in model.named_modules() if isinstance(m, SPARSE_LAYERS)}
        with restore_on_error(model, optimizer):
            self._attach_layers(include, exclude)
            adopted = _adopted.capture({n: m for n, m in self.layers.items() if n in adopted_names})
            self._after_attach()
            self._arm_capture()
        # Adopted layers the set-up changed: put back by a resume (load_state_dict), see
        # methods/_adopted.py; forgotten at the first step.
        self._changed_at_setup = _adopted.changed_by_setup(adopted, self.layers)
        # Last, once nothing can fail: a hook left behind by a failed attach would run.
        self._hook = optimizer.register_step_post_hook(self._after_step)

    def _after_attach(self) -> None:
        """Set-up that needs the sparse layers (runs inside the attach's rollback guard)."""

    # ------------------------------------------------------------------ setup
    def initial_mask(self, name: str, weight: Tensor, sparsity: float, generator: torch.Generator) -> Tensor:
        """Mask a dense layer starts from (default: uniform random at ``sparsity``)."""
        return random_mask(tuple(weight.shape), sparsity, generator=generator).to(weight.device)

    def _attach_layers(self, include, exclude) -> None:
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        dense = eligible_layers(self.model, include, exclude)
        # Tied weights, MultiheadAttention's out_proj, unknown Linear-like classes: said once.
        warn_left_dense(type(self).__name__, left_dense_layers(self.model, include, exclude), stacklevel=4)
        sparse = {n: m for n, m in self.model.named_modules() if isinstance(m, SPARSE_LAYERS)}
        if not dense and not sparse:
            raise ValueError(f"{type(self).__name__}: the model has no nn.Linear / nn.Conv2d layer to sparsify")
        for name, m in {**dense, **sparse}.items():
            p = m.values if isinstance(m, SPARSE_LAYERS) else m.weight
            if id(p) not in held:
                raise ValueError(f"{type(self).__name__}: the optimizer does not hold the weights of layer "
                                 f"'{name}'; build the optimizer on model.parameters() first")
        self._warn_adopted(dense, sparse)
        # linear_weight: a transformers Conv1D's weight [in, out] seen as [out, in], the
        # orientation of its SparseLinear (masks and shapes below are in it).
        per_layer = layer_sparsities({n: tuple(linear_weight(m).shape) for n, m in dense.items()}, self.sparsity,
                                     self.distribution)
        generator = torch.Generator().manual_seed(self.seed)
        for name, module in dense.items():
            mask = self.initial_mask(name, linear_weight(module).detach(), per_layer[name], generator)
            sparse_cls = SparseConv2d if isinstance(module, nn.Conv2d) else SparseLinear
            new = sparse_cls.from_dense(module, mask=mask)
            if module.bias is not None:
                new.bias = module.bias  # same Parameter: the optimizer and its state stay valid
            self._swap_in_optimizer(module.weight, new.values, mask, transposed=is_conv1d(module))
            self._replace(name, new)
        self.layers = {n: m for n, m in self.model.named_modules() if isinstance(m, SPARSE_LAYERS)}

    def _warn_adopted(self, dense: dict, sparse: dict) -> None:
        """Sparse layers the model holds already are trained as they are: says so where one's
        sparsity is not the one the method would have started it at (its ``sparsity`` under
        its ``distribution``, over all the layers), for the methods that start layers at
        that sparsity (the default ``initial_mask``)."""
        if not sparse or type(self).initial_mask is not SparseTrainingMethod.initial_mask:
            return
        shapes = {n: tuple(linear_weight(m).shape) for n, m in dense.items()}
        shapes.update({n: getattr(m, "weight_shape", (m.out_features, m.in_features)) for n, m in sparse.items()})
        expected = layer_sparsities(shapes, self.sparsity, self.distribution)
        off = [f"{n} ({m.sparsity:.3f}, not {expected[n]:.3f})" for n, m in sparse.items()
               if abs(m.sparsity - expected[n]) > 0.01]
        if off:
            warnings.warn(f"{type(self).__name__}: {len(off)} layer(s) of the model are sparse already and are trained "
                          f"at their own sparsity, not at sparsity={self.sparsity} ({self.distribution}): "
                          f"{', '.join(off)}; build the method on the dense model to have it sparsify them",
                          stacklevel=4)

    def _swap_in_optimizer(self, old: nn.Parameter, new: nn.Parameter, mask: Tensor, transposed: bool = False) -> None:
        """Re-points the optimizer from ``old`` to ``new`` and keeps the state at ``mask``
        (row-major, the order of ``new``). ``transposed``: ``old`` and its state are stored
        transposed to the mask (a Conv1D's [in, out])."""
        for group in self.optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = self.optimizer.state.pop(old, None)
        if state:
            flat_mask = mask.reshape(mask.shape[0], -1)
            self.optimizer.state[new] = {
                k: ((v.t() if transposed else v).reshape(flat_mask.shape)[flat_mask].clone()
                    if isinstance(v, Tensor) and v.shape == old.shape else v)
                for k, v in state.items()}

    def _replace(self, name: str, new: nn.Module) -> None:
        if not name:
            raise ValueError(f"{type(self).__name__}: the model itself is a single layer; wrap it in a module")
        swap_module(self.model, name, new)

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
        self._changed_at_setup = {}
        self.step += 1
        try:
            if self.is_update_step(self.step):
                self.update(self.step)
        finally:
            # Re-armed even when the update raised (a refused non-finite step the caller
            # skips): the next update step must capture its inputs again.
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
        """What a resumed run needs besides the model's and the optimizer's state dicts
        (masks and values live in the model's, moments in the optimizer's): the step, the
        seed, the history and the schedule parameters (``schedule_keys``). The methods keep
        no random generator between steps: SET seeds a fresh one from (seed, step, layer)
        at every update, so the seed is the whole random state."""
        return {"method": self.name, "step": self.step, "seed": self.seed, "history": copy.deepcopy(self.history),
                **{k: copy.deepcopy(getattr(self, k)) for k in self.schedule_keys}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restores a :meth:`state_dict`, after the model's and optimizer's own state dicts
        were loaded. The saved schedule parameters replace the constructor's (the resumed
        run continues the saved one); a state saved before they were recorded keeps the
        constructor's. Raises ValueError (TypeError for a non-mapping) on a state of
        another method, a missing or ill-typed entry, or one whose history names layers
        the model does not have as sparse layers."""
        owner = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(f"{owner}: state must be a dict from state_dict(), got {type(state).__name__}")
        if state.get("method") != self.name:
            raise ValueError(f"{owner}: state is for method {state.get('method')!r}, this is {self.name!r}")
        for key in ("step", "seed", "history"):
            if key not in state:
                raise ValueError(f"{owner}: state lacks {key!r}")
        step, seed, history = state["step"], state["seed"], state["history"]
        check_int("step", step, owner, minimum=0)
        check_int("seed", seed, owner, minimum=None)
        if not isinstance(history, list) or not all(isinstance(r, Mapping) and isinstance(r.get("step"), int)
                                                    and r["step"] <= step for r in history):
            raise ValueError(f"{owner}: history must be a list of update records with steps <= step {step}")
        layers = {n: m for n, m in self.model.named_modules() if isinstance(m, SPARSE_LAYERS)}
        named = {n for r in history for n in r.get("layers", {})}
        if not named <= layers.keys():
            raise ValueError(f"{owner}: the history names layers {sorted(named - layers.keys())} that are not "
                             "sparse layers of the model; load the model's state dict first")
        schedule = {k: state[k] for k in self.schedule_keys if k in state}
        self._check_schedule(schedule)
        # All or nothing: what is restored, and what _after_load / _load_extra derive from
        # it, goes back as it was if any of them raises (a half-loaded method would run a
        # mix of two schedules).
        before = dict(self.__dict__)
        try:
            for k, v in schedule.items():
                setattr(self, k, copy.deepcopy(v))
            self.step, self.seed, self.history = step, seed, copy.deepcopy(history)
            self.layers = layers
            self._after_load()
            self._load_extra(state)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise
        if step > 0:  # a resume: the checkpoint's layouts, where the set-up had changed them
            _adopted.restore(getattr(self, "_changed_at_setup", {}), self.layers, self.optimizer)
        self._changed_at_setup = {}
        self._arm_capture()

    def _load_extra(self, state: Mapping) -> None:
        """Checks and restores a subclass's entries beyond the schedule (inside the
        all-or-nothing part of :meth:`load_state_dict`; raise ValueError naming the entry)."""

    def _check_schedule(self, schedule: dict) -> None:
        """Validates saved schedule parameters (ValueError naming the entry)."""
        if "sparsity" in schedule:
            check_sparsity(schedule["sparsity"])
        if "update_interval" in schedule:
            check_int("update_interval", schedule["update_interval"])
        for key in ("total_steps", "t_end", "end_step"):
            if key in schedule:
                check_int(key, schedule[key], allow_none=True)
        if "distribution" in schedule and schedule["distribution"] not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {schedule['distribution']!r}")
        for key in ("drop_fraction", "initial_sparsity"):
            if key in schedule:
                _check_fraction(key, schedule[key])

    def _after_load(self) -> None:
        """Recomputes what derives from the restored schedule (subclasses)."""

    def named_layers(self) -> Iterable[tuple[str, nn.Module]]:
        return self.layers.items()
