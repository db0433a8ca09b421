"""Lottery tickets: iterative magnitude pruning (IMP) with rewinding, on real sparse layers.

Sources:
* Frankle & Carbin, "The lottery ticket hypothesis: finding sparse, trainable neural
  networks", ICLR 2019: train, prune p% of the remaining weights (the output layer at half
  the rate), reset the kept weights to their initial values theta_0, repeat.
* Frankle, Dziugaite, Roy & Carbin, "Linear mode connectivity and the lottery ticket
  hypothesis", ICML 2020: late rewinding, to theta_k after k steps of the first training
  run instead of theta_0.
* Zhou, Lan, Liu & Yosinski, "Deconstructing lottery tickets: zeros, signs, and the
  supermask", NeurIPS 2019: the mask criteria (``large_final``, ``magnitude_increase``,
  ``movement``, ``large_final_same_sign``, ``random``).

The driver is a generator of rounds; the user's own loop trains each round::

    lt = LotteryTicket(model, lambda p: torch.optim.Adam(p, lr=1.2e-3), rounds=10)
    for rnd in lt.rounds():
        train(rnd.model, rnd.optimizer, rnd.scheduler)

The model's ``nn.Linear`` / ``nn.Conv2d`` (and transformers ``Conv1D``) layers become
``SparseLinear`` / ``SparseConv2d`` at density 1 when the driver is built; every prune
rebuilds their CSR pattern with fewer entries (``topology.update_layer``), so later rounds
train on the sparse kernels and their optimizer state is O(nnz). The rewind point is held
as values aligned with each layer's entries and shrinks with every prune: no dense copy of
a layer is kept.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..nn import SparseConv2d, SparseLinear
from ..nn._module_swap import names_by_module, swap_module
from ..nn.sparsify import eligible_layers, left_dense_layers, linear_weight, sparse_class_for, warn_left_dense
from ..topology import update_layer
from .base import unwrap_optimizer, weight_shape

CRITERIA = ("large_final", "magnitude_increase", "movement", "large_final_same_sign", "random")
SCOPES = ("global", "layer")
# Criteria that compare the trained weights with those of the rewind point (Zhou et al.'s w_i).
_NEEDS_START = ("magnitude_increase", "movement", "large_final_same_sign")
_PATTERN_SUFFIXES = ("values", "row_ptr", "col_idx", "t_row_ptr", "t_col_idx", "t_perm")


def mask_scores(criterion: str, final: Tensor, start: Tensor | None,
                generator: torch.Generator | None = None) -> Tensor:
    """Zhou et al.'s mask criteria: the score of each weight, higher is kept.

    Args:
        criterion: one of :data:`CRITERIA`.
        final: trained weights w_f (any shape, float).
        start: the weights the training started from, w_i (same shape; unused by
            ``large_final`` and ``random``).
        generator: drawn from by ``random`` (``torch.rand(final.shape)``).
    Returns:
        Scores, the shape and dtype of ``final``:
        ``large_final`` |w_f|; ``magnitude_increase`` |w_f| - |w_i|; ``movement``
        |w_f - w_i|; ``large_final_same_sign`` |w_f| where sign(w_f) = sign(w_i), else 0
        (max(0, w_i w_f / |w_i|)); ``random`` uniform in [0, 1).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    final = final.detach()
    if criterion == "large_final":
        return final.abs()
    if criterion == "random":
        return torch.rand(final.shape, generator=generator, dtype=final.dtype).to(final.device)
    if start is None or start.shape != final.shape:
        raise ValueError(f"mask_scores: criterion {criterion!r} needs the start weights, of shape {tuple(final.shape)}")
    start = start.detach().to(final.dtype)
    if criterion == "magnitude_increase":
        return final.abs() - start.abs()
    if criterion == "movement":
        return (final - start).abs()
    return torch.where(final * start > 0, final.abs(), torch.zeros_like(final))


def lowest(scores: Tensor, n: int) -> Tensor:
    """Indices of the ``n`` lowest ``scores`` (1-D); among equal scores the earlier index
    goes first, so reruns and the masked-dense reference agree on ties (e.g. the zeros of
    ``large_final_same_sign``)."""
    if n <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    return torch.sort(scores, stable=True).indices[:n]


@dataclass
class Round:
    """One training run of the driver (what ``LotteryTicket.rounds()`` yields).

    Attributes:
        index: 0-based round number (round 0 trains the dense network).
        model: the model (its sparse layers hold this round's mask).
        optimizer: a fresh optimizer from ``optimizer_fn`` (load its state when resuming).
        scheduler: from ``scheduler_fn(optimizer, round)``, or None.
        sparsity: fraction of the pruned layers' weights this round trains without
            (0 in round 0).
        density: 1 - sparsity.
        step: optimizer steps of this round already taken (non-zero only after resuming
            inside a round: the training loop skips that many).
        relative_norm_drop: ||w_pruned|| / ||w|| of the prune before this round (over the
            trained weights of the previous round; 0 in round 0), which ALLR takes.
        nnz: stored weights per layer name.
    """

    index: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    sparsity: float
    density: float
    step: int
    relative_norm_drop: float
    nnz: dict = field(default_factory=dict)


def _check_fraction_open(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


class LotteryTicket:
    """Iterative magnitude pruning with rewinding (Frankle & Carbin, ICLR 2019; late
    rewinding: Frankle, Dziugaite, Roy & Carbin, ICML 2020; mask criteria: Zhou, Lan, Liu &
    Yosinski, NeurIPS 2019), as a round driver over real sparse layers.

    Each round: the user trains (``for rnd in lt.rounds(): train(...)``); when the loop
    asks for the next round the driver prunes ``prune_fraction`` of the remaining weights
    (``output_prune_fraction`` of the output layer's), then rewinds the kept weights (and
    every other parameter and buffer: biases, norms) to the rewind point. The last round is
    not pruned after: the model then holds the trained ticket. Round r trains at sparsity
    about 1 - (1 - prune_fraction)^r over the non-output layers.

    Args:
        model: the network; its ``nn.Linear`` / ``nn.Conv2d`` / transformers ``Conv1D``
            layers become ``SparseLinear`` / ``SparseConv2d`` at density 1 now (layers
            already sparse are taken as they are).
        optimizer_fn: ``optimizer_fn(params) -> torch.optim.Optimizer``, called with
            ``model.parameters()`` at the start of every round.
        prune_fraction: fraction of the remaining weights pruned after each round, in
            (0, 1); paper default 0.2.
        rounds: number of training runs (>= 1); 15 rounds of 0.2 end at 95.6% sparsity.
        rewind_step: where kept weights go after a prune: 0 (default) rewinds to the
            initial weights theta_0 (Frankle & Carbin); k > 0 to the weights after k
            optimizer steps of round 0 (late rewinding, captured by a step hook; a round 0
            shorter than k steps raises ValueError when it ends); None keeps the trained
            weights (fine-tuning / "IMP with retraining", e.g. with the ``schedules``).
        criterion: which weights to keep, one of :data:`CRITERIA` (Zhou et al.); the start
            weights w_i of the criteria are those of the rewind point (theta_0 when
            ``rewind_step`` is None).
        scope: ``"global"`` (one ranking over all non-output layers) or ``"layer"`` (each
            layer prunes ``prune_fraction`` of its own weights).
        output_layer: module name of the output layer (default: the last sparse layer in
            module order).
        output_prune_fraction: its rate, in [0, 1); default ``prune_fraction / 2`` (the
            paper's rule for its fully connected and conv networks). It is always ranked
            on its own, in both scopes.
        scheduler_fn: optional ``scheduler_fn(optimizer, round) -> LRScheduler`` per round.
        seed: seeds the ``random`` criterion (one generator per round: seed + round).
        include, exclude: which dense layers become sparse (as :func:`sparsify`).
        record_masks: keep every round's pattern in ``mask_history`` (CSR ``row_ptr`` and
            ``col_idx`` per layer, O(nnz)), e.g. to train the reinitialised control.

    Attributes:
        layers: name -> sparse layer managed.
        history: one record per finished round: index, sparsity, per-layer nnz, steps
            taken, and the prune that followed it (pruned count per layer, relative norm
            drop).

    Checkpoints: ``state_dict()`` holds the round index, steps taken in the round, the
    rewind point, history and configuration. A resumed run also needs the model's state
    dict (masks and values live there) and the round's optimizer (and scheduler) state
    dicts: build the model and the driver as before, ``model.load_state_dict(...)``,
    ``lt.load_state_dict(...)``, then in the first round yielded load the optimizer's and
    scheduler's state and skip ``rnd.step`` steps.
    """

    def __init__(self, model: nn.Module, optimizer_fn: Callable, *, prune_fraction: float = 0.2, rounds: int,
                 rewind_step: int | None = 0, criterion: str = "large_final", scope: str = "global",
                 output_layer: str | None = None, output_prune_fraction: float | None = None,
                 scheduler_fn: Callable | None = None, seed: int = 0, include=(nn.Linear, nn.Conv2d), exclude=(),
                 record_masks: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"LotteryTicket: model must be an nn.Module, got {type(model).__name__}")
        if not callable(optimizer_fn):
            raise TypeError(f"LotteryTicket: optimizer_fn must be callable (params -> optimizer), got "
                            f"{type(optimizer_fn).__name__}")
        if scheduler_fn is not None and not callable(scheduler_fn):
            raise TypeError(f"LotteryTicket: scheduler_fn must be callable (optimizer, round) -> scheduler or None, "
                            f"got {type(scheduler_fn).__name__}")
        self.prune_fraction = _check_fraction_open("prune_fraction", prune_fraction)
        check_int("rounds", rounds)
        if rewind_step is not None and (isinstance(rewind_step, bool) or not isinstance(rewind_step, int)
                                        or rewind_step < 0):
            raise ValueError(f"rewind_step must be a non-negative int or None (no rewinding), got {rewind_step!r}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if output_prune_fraction is None:
            output_prune_fraction = self.prune_fraction / 2
        if isinstance(output_prune_fraction, bool) or not isinstance(output_prune_fraction, (int, float)) \
                or not 0.0 <= float(output_prune_fraction) < 1.0:
            raise ValueError(f"output_prune_fraction must be a number in [0, 1), got {output_prune_fraction!r}")
        check_int("seed", seed, minimum=None)
        self.model, self.optimizer_fn, self.scheduler_fn = model, optimizer_fn, scheduler_fn
        self.n_rounds, self.rewind_step, self.criterion, self.scope = rounds, rewind_step, criterion, scope
        self.output_prune_fraction, self.seed, self.record_masks = float(output_prune_fraction), seed, record_masks
        self.layers = self._sparsify(include, exclude)
        if output_layer is None:
            output_layer = next(reversed(self.layers))
        if output_layer not in self.layers:
            raise ValueError(f"output_layer must name one of the sparse layers {list(self.layers)}, "
                             f"got {output_layer!r}")
        self.output_layer = output_layer
        self.round, self.round_step, self.in_round = 0, 0, False
        self.history: list[dict] = []
        self.mask_history: list[dict] = []
        self._last_drop = 0.0
        # The rewind point: per layer, values aligned with the layer's entries (shrunk at
        # every prune); the other parameters and buffers as a state-dict fragment.
        self._start: dict[str, Tensor] | None = None
        self._start_rest: dict[str, Tensor] | None = None
        self._keeps_start = rewind_step is not None or criterion in _NEEDS_START
        if self._keeps_start and not self.rewind_step:  # theta_0: now
            self._capture_start()

    # ------------------------------------------------------------------ setup
    def _sparsify(self, include, exclude) -> dict[str, nn.Module]:
        """Swaps the eligible dense layers for sparse ones at density 1; returns every
        sparse layer of the model by name."""
        dense = eligible_layers(self.model, include, exclude)
        warn_left_dense("LotteryTicket", left_dense_layers(self.model, include, exclude), stacklevel=4)
        for name, module in dense.items():
            if not name:
                raise ValueError("LotteryTicket: the model itself is a single layer; wrap it in a module")
            full = torch.ones(linear_weight(module).shape, dtype=torch.bool, device=module.weight.device)
            new = sparse_class_for(module).from_dense(module, mask=full)
            swap_module(self.model, name, new)
        layers = {n: m for n, m in self.model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))}
        if not layers:
            raise ValueError("LotteryTicket: the model has no nn.Linear / nn.Conv2d layer to prune")
        return layers

    def _rest_keys(self) -> list[str]:
        """State-dict keys of everything but the sparse layers' values and patterns."""
        # Under every name of a layer: the state dict holds a shared layer under each.
        names = names_by_module(self.model)
        own = {f"{n}.{s}" for layer in self.layers.values() for n in names[id(layer)] for s in _PATTERN_SUFFIXES}
        return [k for k in self.model.state_dict() if k not in own]

    @torch.no_grad()
    def _capture_start(self) -> None:
        self._start = {n: layer.values.detach().clone() for n, layer in self.layers.items()}
        state = self.model.state_dict()
        self._start_rest = {k: state[k].detach().clone() for k in self._rest_keys()}

    # ------------------------------------------------------------------ sizes
    def layer_nnz(self) -> dict[str, int]:
        return {n: layer.nnz for n, layer in self.layers.items()}

    def _numel(self, name: str) -> int:
        return math.prod(weight_shape(self.layers[name]))

    @property
    def sparsity(self) -> float:
        """Fraction of the managed layers' dense weights not stored now."""
        total = sum(self._numel(n) for n in self.layers)
        return 1.0 - sum(self.layer_nnz().values()) / total if total else 0.0

    def masks(self) -> dict[str, Tensor]:
        """Boolean mask of every managed layer (dense weight shape), by name."""
        return {n: layer.mask() for n, layer in self.layers.items()}

    # ------------------------------------------------------------------ the rounds
    def rounds(self) -> Iterator[Round]:
        """Yields a :class:`Round` per training run; between two yields the driver prunes
        and rewinds. After a resume the first round yielded is the saved one."""
        while self.round < self.n_rounds:
            if not self.in_round:
                self.in_round, self.round_step = True, 0
            optimizer = self.optimizer_fn(self.model.parameters())
            try:
                inner = unwrap_optimizer(optimizer)
            except TypeError as e:
                raise TypeError(f"LotteryTicket: optimizer_fn returned no optimizer: {e}") from None
            held = {id(p) for group in inner.param_groups for p in group["params"]}
            missing = [n for n, layer in self.layers.items() if id(layer.values) not in held]
            if missing:
                raise ValueError(f"LotteryTicket: the optimizer from optimizer_fn does not hold the weights of "
                                 f"{missing}; build it on the params optimizer_fn is given")
            density = 1.0 - self.sparsity
            rnd = Round(self.round, self.model, optimizer, None, 1.0 - density, density, self.round_step,
                        self._last_drop, self.layer_nnz())
            if self.scheduler_fn is not None:
                rnd.scheduler = self.scheduler_fn(optimizer, rnd)
            hook = inner.register_step_post_hook(self._after_step)
            try:
                yield rnd
            finally:
                hook.remove()
            self._end_round()

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.round_step += 1
        if self.round == 0 and self.rewind_step and self.round_step == self.rewind_step and self._keeps_start:
            self._capture_start()  # late rewinding: theta_k

    @torch.no_grad()
    def _end_round(self) -> None:
        if self.round == 0 and self.rewind_step and self.round_step < self.rewind_step:
            raise ValueError(f"rewind_step ({self.rewind_step}) is beyond the first round's length "
                             f"({self.round_step} optimizer steps)")
        record = {"round": self.round, "sparsity": self.sparsity, "nnz": self.layer_nnz(), "steps": self.round_step}
        if self.record_masks:
            self.mask_history.append({n: (l.row_ptr.clone(), l.col_idx.clone()) for n, l in self.layers.items()})
        if self.round + 1 < self.n_rounds:
            record.update(self.prune())
            if self.rewind_step is not None:
                self.rewind()
        self.history.append(record)
        self.round += 1
        self.in_round, self.round_step = False, 0

    # ------------------------------------------------------------------ prune and rewind
    def keep_masks(self) -> dict[str, Tensor]:
        """Per layer, the [nnz] bool over its current entries that the next prune keeps
        (the decision alone; nothing changes)."""
        start = self._start if self.criterion in _NEEDS_START else None
        generator = torch.Generator().manual_seed(self.seed + self.round)
        scores = {n: mask_scores(self.criterion, layer.values, None if start is None else start[n], generator)
                  for n, layer in self.layers.items()}
        keep = {n: torch.ones(layer.nnz, dtype=torch.bool, device=layer.values.device)
                for n, layer in self.layers.items()}
        out = self.output_layer
        keep[out][lowest(scores[out], round(self.output_prune_fraction * self.layers[out].nnz))] = False
        others = [n for n in self.layers if n != out]
        if self.scope == "layer":
            for n in others:
                keep[n][lowest(scores[n], round(self.prune_fraction * self.layers[n].nnz))] = False
        elif others:
            # One ranking over the concatenated entries (layer order, then row-major).
            flat = torch.cat([scores[n].reshape(-1).to(torch.float64) for n in others])
            drop = lowest(flat, round(self.prune_fraction * flat.numel()))
            flat_keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
            flat_keep[drop] = False
            for n, part in zip(others, torch.split(flat_keep, [self.layers[n].nnz for n in others])):
                keep[n] = part
        return keep

    @torch.no_grad()
    def prune(self) -> dict:
        """Prunes every layer by :meth:`keep_masks` now (the driver calls it between
        rounds). Returns ``{"pruned": {name: count}, "relative_norm_drop": float}``."""
        keep = self.keep_masks()
        empty = torch.empty(0, dtype=torch.long)
        pruned, dropped_sq, total_sq = {}, 0.0, 0.0
        for n, layer in self.layers.items():
            values = layer.values.detach().double()
            total_sq += float((values * values).sum())
            dropped_sq += float((values[~keep[n]] ** 2).sum())
            _, source = update_layer(layer, keep[n], empty.to(layer.values.device), empty.to(layer.values.device))
            if self._start is not None:
                self._start[n] = self._start[n][source]  # the rewind point follows the kept entries
            pruned[n] = int((~keep[n]).sum())
        self._last_drop = math.sqrt(dropped_sq / total_sq) if total_sq > 0 else 0.0
        return {"pruned": pruned, "relative_norm_drop": self._last_drop}

    @torch.no_grad()
    def rewind(self) -> None:
        """Sets the kept weights, and every other parameter and buffer, to the rewind
        point (the driver calls it after each prune unless ``rewind_step`` is None)."""
        if self._start is None:
            raise ValueError("LotteryTicket: no rewind point captured yet (rewind_step not reached)")
        for n, layer in self.layers.items():
            layer.values.copy_(self._start[n])
        self.model.load_state_dict(self._start_rest, strict=False)

    # ------------------------------------------------------------------ checkpoints
    _CONFIG = ("prune_fraction", "n_rounds", "rewind_step", "criterion", "scope", "output_layer",
               "output_prune_fraction", "seed")

    def state_dict(self) -> dict:
        """Round index, steps taken in it, whether it is under way, the rewind point,
        history (and ``mask_history``) and configuration. See the class docstring for what
        else a resume needs."""
        return {"method": "lottery_ticket", "round": self.round, "round_step": self.round_step,
                "in_round": self.in_round, "last_drop": self._last_drop,
                "start": None if self._start is None else {n: t.clone() for n, t in self._start.items()},
                "start_rest": None if self._start_rest is None else {k: t.clone() for k, t in self._start_rest.items()},
                "history": copy.deepcopy(self.history), "mask_history": copy.deepcopy(self.mask_history),
                "config": {k: getattr(self, k) for k in self._CONFIG}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restores a :meth:`state_dict` after the model's state dict was loaded (so the
        layers have the saved patterns). Raises ValueError on a state of another
        configuration or whose rewind point does not fit the layers."""
        owner = "LotteryTicket.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(f"{owner}: state must be a dict from state_dict(), got {type(state).__name__}")
        if state.get("method") != "lottery_ticket":
            raise ValueError(f"{owner}: not a LotteryTicket state (method {state.get('method')!r})")
        config = state.get("config", {})
        differ = [k for k in self._CONFIG if k in config and config[k] != getattr(self, k)]
        if differ:
            raise ValueError(f"{owner}: the state was saved with other settings: "
                             + ", ".join(f"{k}={config[k]!r} (this driver: {getattr(self, k)!r})" for k in differ))
        rnd = state.get("round")
        if isinstance(rnd, bool) or not isinstance(rnd, int) or not 0 <= rnd <= self.n_rounds:
            raise ValueError(f"{owner}: round must be an int in [0, {self.n_rounds}], got {rnd!r}")
        start = state.get("start")
        if start is not None:
            bad = [n for n in self.layers if n not in start or start[n].shape != self.layers[n].values.shape]
            if bad or set(start) != set(self.layers):
                names = bad or sorted(set(start) ^ set(self.layers))
                raise ValueError(f"{owner}: the rewind point does not fit the layers {names}; "
                                 "load the model's state dict first")
        step = state.get("round_step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0 \
                or not isinstance(state.get("in_round"), bool):
            raise ValueError(f"{owner}: round_step must be a non-negative int and in_round a bool, got "
                             f"{step!r} and {state.get('in_round')!r}")
        # The rest is checked too before anything changes: a failed load leaves the driver as it was.
        if start is not None and not all(isinstance(t, torch.Tensor) for t in start.values()):
            raise ValueError(f"{owner}: start must map layer names to tensors")
        captured = rnd > 0 or not self.rewind_step or step >= self.rewind_step
        if start is None and self._keeps_start and captured:
            raise ValueError(f"{owner}: the state has no rewind point, but round {rnd} at step {step} is past "
                             f"where it is taken (rewind_step={self.rewind_step})")
        rest = state.get("start_rest")
        if rest is not None and (not isinstance(rest, Mapping)
                                 or not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in rest.items())):
            raise ValueError(f"{owner}: start_rest must be None or map state-dict keys to tensors")
        history, mask_history = state.get("history", []), state.get("mask_history", [])
        for key, value in (("history", history), ("mask_history", mask_history)):
            if not isinstance(value, list) or not all(isinstance(r, Mapping) for r in value):
                raise ValueError(f"{owner}: {key} must be a list of records (dicts), got {type(value).__name__}")
        last_drop = state.get("last_drop", 0.0)
        if isinstance(last_drop, bool) or not isinstance(last_drop, (int, float)) or not 0.0 <= last_drop <= 1.0:
            raise ValueError(f"{owner}: last_drop must be a fraction in [0, 1], got {last_drop!r}")
        self.round, self.round_step, self.in_round = rnd, step, state["in_round"]
        self._last_drop = float(last_drop)
        self._start = None if start is None else {n: t.clone().to(self.layers[n].values) for n, t in start.items()}
        self._start_rest = None if rest is None else {k: t.clone() for k, t in rest.items()}
        self.history = copy.deepcopy(history)
        self.mask_history = copy.deepcopy(mask_history)
