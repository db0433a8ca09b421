"""AC/DC (Peste, Iofinova, Vladu, Alistarh, NeurIPS 2021): alternating compressed and
decompressed phases on the real sparse layers."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..formats import check_sparsity
from ..nn import densify, layer_sparsities
from ..nn._module_swap import names_by_module
from ._phases import check_full, compress, decompress, global_keeps, grow_full, in_block_numel, keep_largest, steps_of
from .base import SparseTrainingMethod, weight_shape

DISTRIBUTIONS = ("global", "uniform", "erk")


def acdc_schedule(total_steps: int, warmup_steps: int, phase_steps: int, dense_end_step: int) -> list[tuple[int, str]]:
    """The phase changes of AC/DC as (step, phase entered) with phase ``"sparse"`` (C) or
    ``"dense"`` (D); training starts dense. The C/D pairs are laid out backwards from
    ``dense_end_step`` (where the last D ends and the final C starts), as many as fit after
    ``warmup_steps``, so the warm-up lasts at least ``warmup_steps`` and less than one pair
    more. Raises ValueError (naming the argument) when no pair fits."""
    if dense_end_step >= total_steps:
        raise ValueError(f"dense_end ({dense_end_step} steps) must be before total_steps ({total_steps}): the "
                         "final compressed phase needs at least one step")
    pairs = (dense_end_step - warmup_steps) // (2 * phase_steps) if dense_end_step >= warmup_steps else 0
    if pairs < 1:
        raise ValueError(f"phase_length: no compressed/decompressed pair of 2 x {phase_steps} steps fits between "
                         f"the warm-up ({warmup_steps} steps) and dense_end ({dense_end_step} steps) of "
                         f"total_steps = {total_steps}")
    first = dense_end_step - 2 * phase_steps * pairs
    changes = []
    for i in range(pairs):
        changes.append((first + 2 * i * phase_steps, "sparse"))
        changes.append((first + (2 * i + 1) * phase_steps, "dense"))
    changes.append((dense_end_step, "sparse"))
    return changes


class ACDC(SparseTrainingMethod):
    """AC/DC: Alternating Compressed/DeCompressed training. Source: A. Peste, E. Iofinova,
    A. Vladu, D. Alistarh, "AC/DC: Alternating Compressed/DeCompressed Training of Deep
    Neural Networks", NeurIPS 2021.

    Training starts dense (warm-up), then alternates compressed (C) and decompressed (D)
    phases of equal length, and ends with a compressed phase. Paper defaults, as fractions
    of ``total_steps``: warm-up 10%, phases 5%, the last D phase ends at 85%, the final C
    phase runs to 100%. The C/D pairs are laid out backwards from ``dense_end`` so that the
    last D ends exactly there; when the span after the warm-up is not a whole number of
    pairs (the paper's 10%..85% is 7.5 pairs) the warm-up is longer by the remainder (with
    the defaults: dense until 15%, 7 C/D pairs, final C from 85%). ``acdc_schedule`` and
    :attr:`changes` list the phase changes.

    * At each C start (after optimizer step ``s``, so step ``s + 1`` runs sparse) the
      weights are pruned by magnitude straight to ``sparsity``: ``distribution="global"``
      (the paper's: one top-k over all sparse layers), ``"uniform"`` or ``"erk"`` (per
      layer). The kept weights keep their optimizer state; the layers run on the CSR kernels.
    * At each D start every position is activated (``grow_to_dense``): pruned weights
      restart at 0 with zero optimizer state, kept weights keep theirs. A layer at density
      1 runs a dense matmul on its values (no masked-dense emulation, no densify per step).

    Args:
        model, optimizer: as :class:`SparseTrainingMethod` (the optimizer built on
            ``model.parameters()``); eligible ``nn.Linear`` / ``nn.Conv2d`` layers become
            sparse layers at density 1.
        sparsity: target of the compressed phases, in [0, 1).
        total_steps: optimizer steps of the whole run (required: the phases are fractions of it).
        distribution: ``"global"`` | ``"uniform"`` | ``"erk"``.
        warmup, phase_length, dense_end: an int is steps, a float a fraction of ``total_steps``.
        keep_dense_model: keep a copy of the dense weights at the end of each D phase (and of
            the warm-up) for :meth:`dense_model`. Memory: one dense tensor per sparse layer
            (its weight, in the layer's dtype) plus a copy of every other parameter and
            buffer, i.e. about one dense model, held from the first C phase on; the index
            tensors are not stored (the layer is full then). ``False`` saves it.
    Attributes:
        phase: ``"dense"`` or ``"sparse"`` (the phase the next optimizer step runs in).
        history: one record per phase change: step, phase, per-layer nnz / dropped / grown.
    """

    name = "acdc"
    schedule_keys = ("sparsity", "distribution", "total_steps", "warmup_steps", "phase_steps", "dense_end_step",
                     "keep_dense_model")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, sparsity: float = 0.9,
                 total_steps: int, distribution: str = "global", warmup: int | float = 0.1,
                 phase_length: int | float = 0.05, dense_end: int | float = 0.85, keep_dense_model: bool = True,
                 seed: int = 0, include=(nn.Linear, nn.Conv2d), exclude=()) -> None:
        total_steps = check_int("total_steps", total_steps)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if not isinstance(keep_dense_model, bool):
            raise TypeError(f"keep_dense_model must be a bool, got {type(keep_dense_model).__name__}")
        check_sparsity(sparsity)
        self.warmup_steps = steps_of("warmup", warmup, total_steps, allow_zero=True)
        self.phase_steps = steps_of("phase_length", phase_length, total_steps)
        self.dense_end_step = steps_of("dense_end", dense_end, total_steps)
        self.keep_dense_model = keep_dense_model
        self.changes = acdc_schedule(total_steps, self.warmup_steps, self.phase_steps, self.dense_end_step)
        self._dense_snapshot: dict | None = None
        # The base class distributes sparsity for the initial masks: they are all-ones here
        # (dense warm-up), so any valid rule does; the real one is set right after.
        self._distribution = distribution
        super().__init__(model, optimizer, sparsity=sparsity, distribution="uniform", update_interval=1, seed=seed,
                         total_steps=total_steps, include=include, exclude=exclude)

    # ------------------------------------------------------------------ schedule
    def initial_mask(self, name: str, weight: Tensor, sparsity: float, generator: torch.Generator) -> Tensor:
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)

    def _after_attach(self) -> None:
        self.distribution = self._distribution
        self._changes_at = dict(self.changes)
        for name, layer in self.layers.items():
            if layer.nnz != in_block_numel(layer):  # a layer that was already sparse joins dense
                grow_full(layer, [self.optimizer])
        if 0 in self._changes_at:  # no warm-up: the first compressed phase starts at once
            self.update(0)

    def phase_at(self, step: int) -> str:
        """The phase optimizer step ``step + 1`` runs in (after ``step`` steps)."""
        phase = "dense"
        for at, entered in self.changes:
            if at <= step:
                phase = entered
        return phase

    @property
    def phase(self) -> str:
        """``"dense"`` or ``"sparse"``: the phase the next optimizer step runs in."""
        return self.phase_at(self.step)

    def is_update_step(self, step: int) -> bool:
        return step in self._changes_at

    def layer_targets(self) -> dict[str, float]:
        """Per-layer sparsity of the compressed phases under ``"uniform"`` / ``"erk"``."""
        shapes = {n: weight_shape(l) for n, l in self.layers.items()}
        return layer_sparsities(shapes, self.sparsity, self.distribution)

    @torch.no_grad()
    def update(self, step: int) -> dict:
        """Enters the phase that starts after ``step`` and records it in ``history``."""
        entered = self._changes_at[step]
        if entered == "sparse":
            for name, layer in self.layers.items():
                check_full(type(self).__name__, name, layer)
            if self.keep_dense_model:
                self._dense_snapshot = self._snapshot()
            if self.distribution == "global":
                keeps = global_keeps(self.layers, self.sparsity)
            else:
                targets = self.layer_targets()
                keeps = {n: keep_largest(l.values, self.layer_nnz(n, targets[n])) for n, l in self.layers.items()}
            layers = compress(self.layers, keeps, self.optimizer)
        else:
            layers = decompress(self.layers, self.optimizer)
        record = {"step": step, "phase": entered, "layers": layers}
        self.history.append(record)
        return record

    # ------------------------------------------------------------------ the dense model of the pair
    def _snapshot(self) -> dict:
        # Under every name of a layer: the state dict holds a shared layer under each.
        names = names_by_module(self.model)
        sparse_keys = {f"{n}.{k}" for layer in self.layers.values() for n in names[id(layer)]
                       for k in ("values", "row_ptr", "col_idx", "t_row_ptr", "t_col_idx", "t_perm")}
        # The previous snapshot's tensors are written over where they fit: a fresh copy of
        # every dense weight at each C start would pay its page faults again (about a
        # third of the phase switch at 4096 wide on the CPU).
        old = self._dense_snapshot or {"layers": {}, "other": {}}

        def keep(previous, t):
            t = t.detach()
            if previous is not None and previous.shape == t.shape and previous.dtype == t.dtype \
                    and previous.device == t.device:
                return previous.copy_(t)
            return t.clone()

        other = {k: keep(old["other"].get(k), v) for k, v in self.model.state_dict().items() if k not in sparse_keys}
        return {"step": self.step, "layers": {n: keep(old["layers"].get(n), l.values) for n, l in self.layers.items()},
                "other": other}

    def dense_model(self) -> nn.Module:
        """A new dense model (``nn.Linear`` / ``nn.Conv2d`` layers) holding the weights the
        model had at the end of the latest decompressed phase (the warm-up counts as one):
        the dense half of AC/DC's co-trained dense/sparse pair. The training model is not
        changed. Raises RuntimeError before the first compressed phase has started or when
        ``keep_dense_model=False``."""
        if not self.keep_dense_model:
            raise RuntimeError("ACDC.dense_model: constructed with keep_dense_model=False, no dense copy was kept")
        if self._dense_snapshot is None:
            raise RuntimeError("ACDC.dense_model: no decompressed phase has ended yet (the model is still dense: "
                               "use it directly)")
        model = copy.deepcopy(self.model)
        model.load_state_dict(self._dense_snapshot["other"], strict=False)
        with torch.no_grad():
            for name, values in self._dense_snapshot["layers"].items():
                layer = model.get_submodule(name)
                grow_full(layer)  # full row-major pattern: the order the snapshot was taken in
                layer.values.copy_(values)
        return densify(model)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The base state plus the kept dense weights (see ``keep_dense_model``)."""
        state = super().state_dict()
        state["dense_snapshot"] = copy.deepcopy(self._dense_snapshot)
        return state

    def _load_extra(self, state: Mapping) -> None:
        snapshot = state.get("dense_snapshot")
        if snapshot is not None and (not isinstance(snapshot, Mapping) or not {"layers", "other"} <= snapshot.keys()
                                     or not isinstance(snapshot["layers"], Mapping)
                                     or not set(snapshot["layers"]) <= set(self.layers)):
            raise ValueError("ACDC.load_state_dict: dense_snapshot must map 'layers' (sparse layer names -> "
                             "values) and 'other' (state dict entries)")
        self._dense_snapshot = copy.deepcopy(snapshot)

    def _check_schedule(self, schedule: dict) -> None:
        if "sparsity" in schedule:
            check_sparsity(schedule["sparsity"])
        if schedule.get("distribution", self.distribution) not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {schedule['distribution']!r}")
        total = check_int("total_steps", schedule.get("total_steps", self.total_steps))
        values = {k: schedule.get(k, getattr(self, k)) for k in ("warmup_steps", "phase_steps", "dense_end_step")}
        for k, v in values.items():
            check_int(k, v, minimum=0 if k == "warmup_steps" else 1)
        acdc_schedule(total, values["warmup_steps"], values["phase_steps"], values["dense_end_step"])
        if not isinstance(schedule.get("keep_dense_model", True), bool):
            raise ValueError("keep_dense_model must be a bool")

    def _after_load(self) -> None:
        self.changes = acdc_schedule(self.total_steps, self.warmup_steps, self.phase_steps, self.dense_end_step)
        self._changes_at = dict(self.changes)
