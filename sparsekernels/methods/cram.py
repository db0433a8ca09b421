"""CrAM (Peste, Vladu, Kurtic, Lampert and Alistarh, ICLR 2023, "CrAM: a compression-aware
minimizer"): dense training whose steps look ahead at a compressed copy of the weights, so
that the trained model keeps its accuracy when one-shot pruned afterwards; and the one-shot
pruning to real sparse layers that follows it."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..formats import kept_count, prune_24
from ..nn import eligible_layers, sparse_class_for, sparsify
from ..nn._module_swap import swap_module
from ..nn.sparsify import linear_weight
from .base import check_generator_state


def _compressible(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights one-shot pruning turns sparse: those of the model's nn.Linear /
    nn.Conv2d (and transformers Conv1D) layers, by layer name."""
    return {name: m.weight for name, m in eligible_layers(model).items()}


def global_keep(magnitudes: Tensor, k: int) -> Tensor:
    """Bool mask [n] keeping the ``k`` largest of ``magnitudes`` [n] (1-D); among equal
    magnitudes at the cut the earlier positions are kept, so the count is exactly ``k``.

    O(n) selection (``kthvalue``) instead of ``topk``: on the digits MLP a ``topk`` keeping
    10-50% of the weights took longer than the step's two forward / backward passes."""
    n = magnitudes.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=magnitudes.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
    cut = torch.kthvalue(magnitudes, n - k).values
    keep = magnitudes > cut
    need = k - int(keep.sum())
    if need > 0:
        keep[(magnitudes == cut).nonzero().squeeze(1)[:need]] = True
    return keep


def _check_target(value: object) -> float | str:
    if value == "2:4":
        return "2:4"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)) \
            or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"CrAM: sparsities must hold numbers in [0, 1) and/or '2:4', got {value!r}")
    return float(value)


class CrAM(torch.optim.Optimizer):
    """CrAM / CrAM+ (Peste et al., ICLR 2023) around a base optimizer.

    Every ``step(closure)`` computes, from the closure (which zeroes the gradients,
    recomputes the loss, calls ``backward()`` and returns the loss, as SAM-style optimizers
    take it):

    * g0 = dL/dθ at the current weights θ (the "clean" pass; BatchNorm running statistics
      come from this pass only);
    * θ~ = C_k(θ + ρ g0), with C_k a compressor drawn uniformly per step from
      ``sparsities``: a number s is a global magnitude top-k over the compressible weights
      keeping k = round((1 - s) * their count) (ties at the cut: earlier weights first);
      ``"2:4"`` keeps the 2 largest |w| of every
      4 consecutive inputs of every linear weight whose input size is a multiple of 4
      (through ``sparsekernels.formats.prune_24``; other weights are left as they are);
    * g1 = dL/dθ at θ~ (the compressed pass; BatchNorm statistics restored afterwards when
      ``model`` is given);
    * θ <- base step with gradient g0 + g1 (CrAM+, ``plus=True``, the paper's recommended
      variant) or g1 (CrAM). With plain SGD: θ <- θ - η [∇L(θ) + ∇L(C_k(θ + ρ∇L(θ)))].

    A step costs two forward / backward passes. The paper's defaults: CrAM+ with several
    sparsity levels ("CrAM+-Multi"), ρ = 0.05.

    Args:
        params_or_base_optimizer: a ``torch.optim.Optimizer`` to wrap, or parameters for
            ``base_optimizer(params, **base_kwargs)``.
        model: the model (recommended): its nn.Linear / nn.Conv2d weights are the
            compressible ones, the base optimizer must hold them, and its BatchNorm
            statistics are kept from the clean pass. Without it, every parameter with
            dim >= 2 is compressible and BatchNorm statistics also see the compressed pass.
        sparsities: non-empty set of targets in [0, 1) and/or ``"2:4"``.
        rho: perturbation size ρ >= 0; plus: CrAM+ (True) or CrAM.
        seed: seed of the per-step draw of the target (saved by ``state_dict``).
    """

    def __init__(self, params_or_base_optimizer, model: nn.Module | None = None, *,
                 sparsities=(0.5, 0.7, 0.9), rho: float = 0.05, plus: bool = True,
                 base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD, seed: int = 0,
                 **base_kwargs) -> None:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or math.isnan(float(rho)) or rho < 0:
            raise ValueError(f"CrAM: rho must be a number >= 0, got {rho!r}")
        if isinstance(sparsities, (str, float, int)):
            sparsities = (sparsities,)
        targets = tuple(_check_target(s) for s in sparsities)
        if not targets:
            raise ValueError("CrAM: sparsities must hold at least one target (a sparsity in [0, 1) or '2:4')")
        if not isinstance(plus, bool):
            raise TypeError(f"CrAM: plus must be a bool, got {type(plus).__name__}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"CrAM: model must be an nn.Module or None, got {type(model).__name__}")
        check_int("seed", seed, "CrAM", minimum=None)
        if isinstance(params_or_base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise TypeError(f"CrAM: base optimizer arguments {sorted(base_kwargs)} given with an optimizer "
                                "already built")
            base = params_or_base_optimizer
        else:
            base = base_optimizer(params_or_base_optimizer, **base_kwargs)
        held = {id(p) for g in base.param_groups for p in g["params"]}
        if model is not None:
            compressible = _compressible(model)
            missing = [n for n, p in compressible.items() if id(p) not in held]
            missing += [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held
                        and n.rsplit(".", 1)[0] not in compressible]
            if missing:
                raise ValueError(f"CrAM: the base optimizer does not hold the model's parameters {missing}; build it "
                                 "on model.parameters()")
            self._compress_params = list(compressible.values())
            self._norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        else:
            self._compress_params = [p for g in base.param_groups for p in g["params"] if p.dim() >= 2]
            self._norms = []
        if not self._compress_params:
            raise ValueError("CrAM: nothing to compress: the model has no nn.Linear / nn.Conv2d layer (without a "
                             "model: the optimizer holds no parameter of 2 or more dimensions)")
        self.base_optimizer = base
        self.sparsities, self.rho, self.plus, self.seed = targets, float(rho), plus, seed
        self._generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.last_target: float | str | None = None
        super().__init__(base.param_groups, dict(base.defaults))
        # One set of groups and state: lr schedulers and zero_grad on CrAM act on the base's.
        self.param_groups = base.param_groups
        self.state = base.state

    # ------------------------------------------------------------------ compression
    def draw(self) -> float | str:
        """The next compression target (advances the seeded generator)."""
        return self.sparsities[int(torch.randint(len(self.sparsities), (1,), generator=self._generator))]

    @torch.no_grad()
    def compress_(self, target: float | str) -> None:
        """Applies C_target in place to the compressible weights."""
        params = self._compress_params
        if target == "2:4":
            for p in params:
                if p.dim() == 2 and p.shape[1] % 4 == 0:
                    p.mul_(prune_24(p))
            return
        mags = torch.cat([p.detach().abs().reshape(-1) for p in params])
        keep = global_keep(mags, kept_count(mags.numel(), target))
        offset = 0
        for p in params:
            p.mul_(keep[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    # ------------------------------------------------------------------ the step
    def step(self, closure: Callable[[], Tensor] | None = None):
        """One CrAM step; ``closure`` is required (see the class docstring). Returns the
        loss of the clean pass."""
        if closure is None:
            raise ValueError("CrAM.step needs a closure that zeroes the gradients, computes the loss, calls "
                             "backward() and returns the loss")
        with torch.enable_grad():
            loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        saved = [p.detach().clone() for p in params]
        clean = [p.grad.detach().clone() for p in params]
        target = self.draw()
        with torch.no_grad():
            for p, g in zip(params, clean):
                p.add_(g, alpha=self.rho)
            self.compress_(target)
        stats = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in self._norms]
        with torch.enable_grad():
            closure()
        with torch.no_grad():
            for m, s in zip(self._norms, stats):
                for name, value in s.items():
                    getattr(m, name).copy_(value)
            for p, w, g in zip(params, saved, clean):
                p.copy_(w)
                if p.grad is None:
                    p.grad = g.clone() if self.plus else torch.zeros_like(g)
                elif self.plus:
                    p.grad.add_(g)
        self.base_optimizer.step()
        self.steps += 1
        self.last_target = target
        return loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The base optimizer's state dict plus CrAM's own (steps, target generator)."""
        state = self.base_optimizer.state_dict()
        state["cram"] = {"steps": self.steps, "generator": self._generator.get_state(), "seed": self.seed,
                         "sparsities": list(self.sparsities), "rho": self.rho, "plus": self.plus}
        return state

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restores a :meth:`state_dict`: CrAM's own entries are checked before the base
        optimizer's state is loaded (a bad one leaves everything as it was). A state saved
        with other targets, rho, plus or seed is refused: the resumed run would draw and
        perturb differently from the saved one."""
        owner = "CrAM.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{owner}: state must be a dict from state_dict(), got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        cram = state_dict.pop("cram", None)
        if not isinstance(cram, Mapping) or not {"steps", "generator"} <= cram.keys():
            raise ValueError(f"{owner}: state lacks the 'cram' entry of CrAM.state_dict()")
        steps, generator = cram["steps"], cram["generator"]
        check_int("steps", steps, owner, minimum=0)
        check_generator_state(owner, generator)
        mine = {"sparsities": list(self.sparsities), "rho": self.rho, "plus": self.plus, "seed": self.seed}
        differ = [k for k, v in mine.items() if k in cram and cram[k] != v]
        if differ:
            raise ValueError(f"{owner}: the state was saved with other {', '.join(differ)} "
                             f"({', '.join(f'{k}={cram[k]!r}' for k in differ)}); build CrAM with the saved ones")
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups, self.state = self.base_optimizer.param_groups, self.base_optimizer.state
        self.steps = steps
        self._generator.set_state(generator)


def one_shot_prune(model: nn.Module, target: float | str = 0.9, *, inplace: bool = True) -> nn.Module:
    """Prunes a (CrAM-trained) dense model once, with no retraining, to real sparse layers.

    ``target`` a sparsity in [0, 1): global magnitude pruning over the nn.Linear /
    nn.Conv2d weights (C_k of :class:`CrAM`), each layer becoming a ``SparseLinear`` /
    ``SparseConv2d`` with the kept weights. ``"2:4"``: every nn.Linear whose input size is
    a multiple of 4 becomes a ``Sparse24Linear`` (2:4 magnitude mask); convolutions stay
    dense. Recalibrate BatchNorm afterwards
    (:func:`sparsekernels.methods.recalibrate_batchnorm`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"one_shot_prune: model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    target = _check_target(target)
    if target == "2:4":
        return sparsify(model, format="2:4", include=(nn.Linear,))
    layers = eligible_layers(model)
    if not layers:
        raise ValueError("one_shot_prune: the model has no nn.Linear / nn.Conv2d layer")
    weights = {n: linear_weight(m).detach() for n, m in layers.items()}
    mags = torch.cat([w.abs().reshape(-1) for w in weights.values()])
    keep = global_keep(mags, kept_count(mags.numel(), target))
    offset = 0
    for name, module in layers.items():
        w = weights[name]
        mask = keep[offset:offset + w.numel()].view(w.shape)
        offset += w.numel()
        new = sparse_class_for(module).from_dense(module, mask=mask)
        if not name:
            raise ValueError("one_shot_prune: the model itself is a single layer; wrap it in a module")
        swap_module(model, name, new)
    return model
