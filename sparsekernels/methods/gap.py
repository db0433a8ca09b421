"""GaP (Ma, Qin, Sun et al., ICLR 2022): cyclic grow-and-prune of layer partitions on
the real sparse layers."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_int
from ..formats import check_sparsity
from ..nn import layer_sparsities
from ..nn.distribution import DISTRIBUTIONS
from ._phases import check_full, compress, decompress, keep_largest, steps_of
from .base import SparseTrainingMethod, weight_shape


def gap_schedule(total_steps: int, partitions: int, cycles: int, phase_steps: int) -> list[tuple[int, int | None, int | None]]:
    """The changes of cyclic GaP as (step, group pruned or None, group grown or None):
    group 0 is grown at step 0; after every ``phase_steps`` steps the dense group is pruned
    and the next one (cyclically) grown; after ``cycles * partitions`` phases the last one is
    pruned and nothing is grown (fine-tuning to ``total_steps``). ValueError (naming the
    argument) when the phases do not fit ``total_steps``."""
    phases = cycles * partitions
    if phases * phase_steps > total_steps:
        raise ValueError(f"phase_length: {phases} grow phases (cycles {cycles} x partitions {partitions}) of "
                         f"{phase_steps} steps do not fit total_steps = {total_steps}")
    changes: list[tuple[int, int | None, int | None]] = [(0, None, 0)]
    for j in range(1, phases + 1):
        changes.append((j * phase_steps, (j - 1) % partitions, j % partitions if j < phases else None))
    return changes


def split_contiguous(names: list[str], partitions: int) -> list[list[str]]:
    """``names`` (model order) in ``partitions`` contiguous groups whose sizes differ by at
    most one, the larger groups first."""
    base, extra = divmod(len(names), partitions)
    groups, start = [], 0
    for g in range(partitions):
        size = base + (1 if g < extra else 0)
        groups.append(names[start:start + size])
        start += size
    return groups


class GaP(SparseTrainingMethod):
    """Cyclic grow-and-prune (C-GaP). Source: X. Ma, M. Qin, F. Sun, Z. Hou, K. Yuan, Y. Xu,
    Y. Wang, Y.-K. Chen, R. Jin, Y. Xie, "Effective Model Sparsification by Scheduled
    Grow-and-Prune Methods", ICLR 2022 (arXiv 2106.09857).

    The sparse layers are split, in model order, into ``partitions`` contiguous groups of
    (nearly) equal layer count. Every layer starts at its target sparsity with a random mask
    (seeded by ``seed``). Group 0 is grown to density 1 at once and trained for one phase;
    then it is pruned back to its target by magnitude (per layer) and group 1 is grown, and
    so on cyclically, for ``cycles`` rounds over all groups. After the last phase every group
    is sparse and training continues on fixed masks (fine-tuning) to ``total_steps``.

    Choices where the paper leaves a knob to the setting (stated so a run is reproducible):
    4 partitions (the paper's ResNet-50 setting), grown weights start at zero with zero
    optimizer state (as AC/DC's decompression), magnitude pruning per layer to a uniform
    target (``distribution="erk"`` also works), ``cycles=3`` and the last 25% of training as
    fine-tuning, so by default every phase is 0.75 / 12 = 6.25% of ``total_steps``. The grow
    phases run on layers at density 1 (a dense matmul on the values), the other groups on
    the CSR kernels.

    Args:
        model, optimizer: as :class:`SparseTrainingMethod`.
        sparsity: target of every layer's pruning, in [0, 1).
        total_steps: optimizer steps of the whole run (required).
        partitions: number of layer groups, in [1, number of sparse layers].
        cycles: rounds over all groups (positive int).
        phase_length: steps of one grow phase (int) or a fraction of ``total_steps`` (float);
            default (None): ``(1 - finetune) * total_steps / (cycles * partitions)``.
        finetune: fraction of ``total_steps`` left for fine-tuning when ``phase_length`` is None.
    Attributes:
        groups: the layer names of each partition.
        dense_group: index of the group at density 1 for the next step (None when fine-tuning).
        history: one record per change: step, pruned / grown group, per-layer nnz.
    """

    name = "gap"
    schedule_keys = ("sparsity", "distribution", "total_steps", "partitions", "cycles", "phase_steps")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, sparsity: float = 0.9,
                 total_steps: int, partitions: int = 4, cycles: int = 3, phase_length: int | float | None = None,
                 finetune: float = 0.25, distribution: str = "uniform", seed: int = 0,
                 include=(nn.Linear, nn.Conv2d), exclude=()) -> None:
        total_steps = check_int("total_steps", total_steps)
        self.partitions = check_int("partitions", partitions)
        self.cycles = check_int("cycles", cycles)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if isinstance(finetune, bool) or not isinstance(finetune, (int, float)) or not 0.0 <= finetune < 1.0:
            raise ValueError(f"finetune must be a fraction of total_steps in [0, 1), got {finetune!r}")
        if phase_length is None:
            phase_steps = int(total_steps * (1.0 - finetune)) // (self.cycles * self.partitions)
            if phase_steps < 1:
                raise ValueError(f"total_steps ({total_steps}) is too short for {self.cycles} cycles over "
                                 f"{self.partitions} partitions (phase_length would be 0 steps)")
        else:
            phase_steps = steps_of("phase_length", phase_length, total_steps)
        self.phase_steps = phase_steps
        gap_schedule(total_steps, self.partitions, self.cycles, phase_steps)
        super().__init__(model, optimizer, sparsity=sparsity, distribution=distribution, update_interval=1,
                         seed=seed, total_steps=total_steps, include=include, exclude=exclude)

    # ------------------------------------------------------------------ schedule
    def _after_attach(self) -> None:
        if self.partitions > len(self.layers):
            raise ValueError(f"partitions ({self.partitions}) must be at most the number of sparse layers "
                             f"({len(self.layers)})")
        self._after_load()
        self.update(0)  # group 0 grows before the first step

    def _after_load(self) -> None:
        self.groups = split_contiguous(list(self.layers), self.partitions)
        self.changes = gap_schedule(self.total_steps, self.partitions, self.cycles, self.phase_steps)
        self._changes_at = {step: (pruned, grown) for step, pruned, grown in self.changes}
        shapes = {n: weight_shape(l) for n, l in self.layers.items()}
        self.targets = layer_sparsities(shapes, self.sparsity, self.distribution)

    def dense_group_at(self, step: int) -> int | None:
        """The group at density 1 for optimizer step ``step + 1``."""
        current = None
        for at, _, grown in self.changes:
            if at <= step:
                current = grown
        return current

    @property
    def dense_group(self) -> int | None:
        return self.dense_group_at(self.step)

    def is_update_step(self, step: int) -> bool:
        return step in self._changes_at

    @torch.no_grad()
    def update(self, step: int) -> dict:
        """Prunes the group whose phase ended at ``step`` and grows the next one."""
        pruned, grown = self._changes_at[step]
        layers: dict[str, dict] = {}
        if pruned is not None:
            group = {n: self.layers[n] for n in self.groups[pruned]}
            for name, layer in group.items():
                check_full(type(self).__name__, name, layer)
            keeps = {n: keep_largest(l.values, self.layer_nnz(n, self.targets[n])) for n, l in group.items()}
            layers.update(compress(group, keeps, self.optimizer))
        if grown is not None:
            layers.update(decompress({n: self.layers[n] for n in self.groups[grown]}, self.optimizer))
        record = {"step": step, "pruned_group": pruned, "grown_group": grown, "layers": layers}
        self.history.append(record)
        return record

    def _check_schedule(self, schedule: dict) -> None:
        if "sparsity" in schedule:
            check_sparsity(schedule["sparsity"])
        if schedule.get("distribution", self.distribution) not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {schedule.get('distribution')!r}")
        values = {k: schedule.get(k, getattr(self, k)) for k in ("total_steps", "partitions", "cycles", "phase_steps")}
        for k, v in values.items():
            check_int(k, v)
        if values["partitions"] > len(self.layers):
            raise ValueError(f"partitions ({values['partitions']}) must be at most the number of sparse layers "
                             f"({len(self.layers)})")
        gap_schedule(values["total_steps"], values["partitions"], values["cycles"], values["phase_steps"])
