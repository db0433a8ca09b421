"""What the Lightning and Hugging Face callbacks share: resolving and building the method on
the trainer's optimizer, and making the sparse layers a checkpoint holds exist while the
trainer loads it into a dense-constructed model.

Imports no trainer framework: each callback module brings its own.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping

from torch import nn

from .._checks import check_int
from ..formats import check_sparsity
from ..methods.base import unwrap_optimizer
from ..methods.registry import get_method
from ..nn import BSRLinear, Sparse24Linear, SparseConv2d, SparseLinear
from .checkpoint import SPARSE24_OPTIONS, load_sparse_state_dict

SPARSE_LAYER_TYPES = (SparseLinear, SparseConv2d, BSRLinear, Sparse24Linear)


def resolve_method(owner: str, method: object, method_kwargs: Mapping[str, object]) -> tuple[type, dict]:
    """(method class, its keyword arguments) for a callback, checked up front so a typo fails
    when the callback is built, not after the trainer has set everything up."""
    cls = get_method(method)
    kwargs = dict(method_kwargs)
    for reserved in ("model", "optimizer"):
        if reserved in kwargs:
            raise TypeError(f"{owner}: {reserved!r} is not a method argument here; the callback passes the "
                            f"trainer's {reserved} itself")
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # no introspectable signature: the constructor checks for itself
        return cls, kwargs
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise TypeError(f"{owner}: {cls.__name__} takes no argument(s) {', '.join(map(repr, unknown))}; it takes "
                            f"{', '.join(n for n in params if n not in ('self', 'model', 'optimizer'))}")
    _check_common_kwargs(owner, kwargs)
    return cls, kwargs


def _check_common_kwargs(owner: str, kwargs: Mapping[str, object]) -> None:
    """The arguments most methods share, checked as the methods do, when the callback is
    built: a bad one otherwise fails only once the trainer has set everything up."""
    try:
        if "sparsity" in kwargs:
            check_sparsity(kwargs["sparsity"])
        for name in ("update_interval", "total_steps"):
            if name in kwargs:
                check_int(name, kwargs[name], allow_none=True)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{owner}: {exc}") from None


def restore_method_state(method, state: object) -> None:
    """``method.load_state_dict(state)``; if that fails the method is detached (its step
    hook removed) before the error goes on, so a failed resume leaves no hook running."""
    try:
        method.load_state_dict(state)
    except BaseException:
        remove = getattr(method, "remove", None)
        if callable(remove):
            remove()
        raise


def accepts_total_steps(cls: type) -> bool:
    try:
        return "total_steps" in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def build_method(cls: type, kwargs: Mapping[str, object], model: nn.Module, optimizer: object,
                 total_steps: float | int | None):
    """``cls(model, optimizer, **kwargs)`` on the real optimizer under the trainer's wrapper.

    ``total_steps`` (the trainer's count of optimizer steps for the whole run) is passed when
    the method takes it and the user gave none, so a schedule spans the run by default.
    """
    kwargs = dict(kwargs)
    if ("total_steps" not in kwargs and total_steps is not None and math.isfinite(total_steps) and total_steps > 0
            and accepts_total_steps(cls)):
        kwargs["total_steps"] = int(total_steps)
    return cls(model, unwrap_optimizer(optimizer), **kwargs)


def has_sparse_layers(model: nn.Module) -> bool:
    return any(isinstance(m, SPARSE_LAYER_TYPES) for m in model.modules())


class SparseLayersOnLoad:
    """A ``load_state_dict`` pre-hook on ``model``: when a state dict being loaded holds keys
    the model lacks (a sparse layer's ``values``, ``row_ptr``, ... where the model still has a
    dense ``weight``), the dense modules are swapped for the sparse ones the keys describe
    (:func:`load_sparse_state_dict`) before the model's own load goes on. Trainers load a
    checkpoint into the freshly constructed, dense model before any optimizer exists; this
    lets that load find the layers it saved.

    A state dict whose keys the model already has passes through untouched.
    """

    def __init__(self, model: nn.Module, method_kwargs: dict | None = None) -> None:
        self.model = model
        # 2:4 options no tensor records, from the method the callback trains with (SR-STE's
        # transposable / srste_lambda / update_every): a resumed run rebuilds its layers
        # as they were, not with the defaults.
        kwargs = method_kwargs or {}
        self.sparse24_options = {k: kwargs[k] for k in SPARSE24_OPTIONS if k in kwargs}
        self._busy = False
        self._handle = model.register_load_state_dict_pre_hook(self._before_load)

    def _before_load(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                     error_msgs) -> None:
        if self._busy:  # the nested load below
            return
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if set(own) <= set(module.state_dict(keep_vars=True)):
            return
        self._busy = True
        try:
            # Swaps, then loads non-strictly (the trainer's own load that follows applies
            # its strictness to the now matching module tree).
            load_sparse_state_dict(module, own, strict=False, sparse24_options=self.sparse24_options or None)
        finally:
            self._busy = False

    def remove(self) -> None:
        self._handle.remove()
