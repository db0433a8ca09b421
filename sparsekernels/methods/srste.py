"""SR-STE (Zhou et al. 2021): 2:4 training from dense master weights."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..nn import Sparse24Linear, eligible_layers, left_dense_layers
from ..nn._module_swap import swap_module
from ..ops.sparse24 import check_srste_lambda
from .base import restore_on_error, unwrap_optimizer


class SRSTE:
    """Swaps the model's ``nn.Linear`` layers (in_features divisible by 4) for
    ``Sparse24Linear(mode="srste")`` sharing the SAME weight Parameter, so the optimizer
    and its state need no change. Each training forward (every ``update_every``) re-prunes
    the weight to 2:4 by magnitude, runs the compressed forward, and back-propagates
    dW = dy^T x + lambda_w (1 - E) W. ``remove()`` freezes the masks.

    ``optimizer`` may be a trainer's wrapper (see :func:`unwrap_optimizer`); a failure while
    swapping leaves the model as it was. ``total_steps`` is recorded (every method takes
    it) and changes nothing: the mask follows the weights at every update, with no step
    schedule.
    """

    name = "srste"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, srste_lambda: float = 2e-4,
                 update_every: int = 1, transposable: bool = False, total_steps: int | None = None,
                 exclude=()) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"SRSTE: model must be an nn.Module, got {type(model).__name__}")
        try:
            optimizer = unwrap_optimizer(optimizer)
        except TypeError as e:
            raise TypeError(f"SRSTE: {e}") from None
        self.total_steps = check_int("total_steps", total_steps, allow_none=True)
        if not isinstance(transposable, bool):
            raise TypeError(f"SRSTE: transposable must be a bool, got {transposable!r}")
        self.srste_lambda, self.update_every, self.transposable = srste_lambda, update_every, transposable
        self.model, self.optimizer = model, optimizer
        self.layers: dict[str, Sparse24Linear] = {}
        # As every method has: the record of topology updates. SR-STE's masks follow the
        # weights inside every training forward, with no update step to record: it stays empty.
        self.history: list[dict] = []
        with restore_on_error(model, optimizer):
            self._attach(exclude)

    def _attach(self, exclude) -> None:
        model, transposable = self.model, self.transposable
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        # Tied weights, MultiheadAttention's out_proj, unknown Linear-like classes (as sparsify).
        skipped = [f"{n} ({why})" for n, why in left_dense_layers(model, (nn.Linear,), exclude).items()]
        # Layers already SR-STE (a model rebuilt from a checkpoint before resuming) are taken
        # over as they are.
        for name, module in model.named_modules():
            if isinstance(module, Sparse24Linear) and module.mode == "srste":
                if id(module.weight) not in held:
                    raise ValueError(f"SRSTE: the optimizer does not hold the weight of layer '{name}'")
                self.layers[name] = module
        for name, module in eligible_layers(model, (nn.Linear,), exclude).items():
            if not isinstance(module, nn.Linear):
                # A transformers Conv1D stores its weight [in, out]; SR-STE trains the layer's
                # own weight Parameter as the [out, in] master, which a transposed one is not.
                skipped.append(f"{name} (Conv1D: weight stored transposed)")
                continue
            if module.in_features % 4 or (transposable and module.out_features % 4):
                skipped.append(f"{name} (in_features not divisible by 4)")
                continue
            if id(module.weight) not in held:
                raise ValueError(f"SRSTE: the optimizer does not hold the weight of layer '{name}'")
            layer = Sparse24Linear.from_dense(module, mode="srste", srste_lambda=self.srste_lambda,
                                              update_every=self.update_every, transposable=transposable)
            layer.weight = module.weight  # the same Parameter: optimizer state stays valid
            layer.bias = module.bias
            if not name:
                raise ValueError("SRSTE: the model itself is a single layer; wrap it in a module")
            swap_module(model, name, layer)
            self.layers[name] = layer
        if not self.layers:
            raise ValueError("SRSTE: no nn.Linear layer with in_features divisible by 4")
        if skipped:
            warnings.warn("SRSTE: left dense: " + ", ".join(skipped), stacklevel=3)

    def masks(self) -> dict[str, Tensor]:
        return {n: layer.mask() for n, layer in self.layers.items()}

    def remove(self) -> None:
        for layer in self.layers.values():
            layer.freeze_mask = True

    def state_dict(self) -> dict:
        """The training-forward count of every layer (it decides which forwards re-prune)
        and the arguments. The weights and masks (meta) live in the model's state dict."""
        return {"method": self.name, "forwards": {n: layer._forwards for n, layer in self.layers.items()},
                "frozen": {n: layer.freeze_mask for n, layer in self.layers.items()},
                "total_steps": self.total_steps, "srste_lambda": self.srste_lambda,
                "update_every": self.update_every, "transposable": self.transposable}

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict` (ValueError on a state of another method, of other
        layers, or with an ill-typed entry, TypeError on a non-mapping); all of it is checked
        before anything is restored. The saved ``srste_lambda`` and ``update_every`` replace
        the method's own (the layers keep theirs); a saved ``transposable`` must match the
        layers' (their masks were built for it)."""
        owner = "SRSTE.load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"{owner}: state must be a dict from state_dict(), got {type(state).__name__}")
        if state.get("method") != self.name:
            raise ValueError(f"{owner}: state is for method {state.get('method')!r}")
        forwards = state.get("forwards")
        if not isinstance(forwards, dict) or set(forwards) != set(self.layers):
            raise ValueError(f"{owner}: 'forwards' must name the layers {sorted(self.layers)}, got "
                             f"{sorted(forwards) if isinstance(forwards, dict) else forwards!r}")
        for n, count in forwards.items():
            check_int(f"forward count of '{n}'", count, owner, minimum=0)
        frozen = state.get("frozen", {})
        if not isinstance(frozen, dict) or not set(frozen) <= set(self.layers) or not all(
                isinstance(v, bool) for v in frozen.values()):
            raise ValueError(f"{owner}: 'frozen' must map layer names to bools, got {frozen!r}")
        total_steps = check_int("total_steps", state.get("total_steps", self.total_steps), allow_none=True)
        lam = check_srste_lambda(owner, "srste_lambda", state.get("srste_lambda", self.srste_lambda))
        update_every = check_int("update_every", state.get("update_every", self.update_every))
        if state.get("transposable", self.transposable) != self.transposable:
            raise ValueError(f"{owner}: the state was saved with transposable={state['transposable']}, these layers "
                             f"are transposable={self.transposable}")
        self.total_steps, self.srste_lambda, self.update_every = total_steps, lam, update_every
        # The layers keep their own srste_lambda / update_every (those it adopted may differ
        # from the method's; their checkpoint holds them): the method's are what it gives the
        # layers it builds.
        for n, layer in self.layers.items():
            layer._forwards = forwards[n]
            if n in frozen:
                layer.freeze_mask = frozen[n]
