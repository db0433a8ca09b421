"""FreeTickets (Liu, Chen, Atashgahi, Chen, Chen, Zhang, Mocanu, Wang, Pechenizkiy and
Mocanu, ICLR 2022, "Deep ensembling with no overhead for either training or testing: the
all-round blessings of dynamic sparsity"): ensembles of sparse networks from dynamic sparse
training. :class:`EDST` draws M tickets from one run of the budget of one dense run;
:class:`DSTEnsemble` trains M independent RigL runs (distinct seeds)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from .._checks import check_int
from .base import _check_fraction
from .registry import register_method
from .rigl import RigL
from .schedules import cosine_drop_fraction


def _check_open_fraction(name: str, value: object, low_open: bool, high_open: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(float(value))
    if ok:
        v = float(value)
        ok = (v > 0.0 if low_open else v >= 0.0) and (v < 1.0 if high_open else v <= 1.0)
    if not ok:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


class EDST(RigL):
    """EDST, "efficient dynamic sparse training" ensembles (FreeTickets, Liu et al., ICLR 2022).

    One sparse run of ``total_steps`` optimizer steps (the budget of one dense run) is
    split into an exploration phase of ``total_steps - tickets * t_re`` steps and
    ``tickets`` refinement phases of ``t_re = floor((1 - exploration_fraction) *
    total_steps / tickets)`` steps each. Every phase trains the sparse model with RigL's
    topology updates (ERK layer densities, magnitude drop, gradient growth, drop fraction
    ``drop_fraction`` = 0.5 with cosine decay over the first 75% of the phase, an update
    every ``update_interval`` steps). Each refinement phase starts (after its first step)
    with a global exploration: ``explore_fraction`` = 80% of every layer's active weights
    are dropped by magnitude and as many positions regrown by |gradient|, which moves the
    run to a different basin; the model at the phase's end is a ticket.

    Learning rate (``lr_reset=True``): the exploration phase runs at the optimizer's
    learning rate at attach time (the base lr of each param group); every refinement phase
    resets it to the base lr and decays it in steps, 10x at 50% and 100x at 75% of the
    phase. The method then owns the lr: do not attach another scheduler.
    ``lr_reset=False`` leaves the lr to the caller. The 80% exploration drop, the drop
    fraction 0.5 with cosine decay and ERK are the paper's settings; the phase lengths
    (``exploration_fraction`` = 0.5) and the in-phase decay are this implementation's
    defaults, as the paper sets them per dataset.

    After training, ``.tickets`` is a list of ``tickets`` state dicts of the sparse model
    (values + CSR pattern + buffers: O(nnz) each); build the ensemble with
    ``sparsekernels.ensemble.Ensemble.from_tickets(model, edst.tickets)``. Stepping past
    ``total_steps`` raises RuntimeError: the budget is the method's point.

    Args (besides RigL's): ``total_steps`` (required), ``tickets`` M >= 1,
    ``exploration_fraction`` in [0, 1), ``explore_fraction`` in (0, 1], ``lr_reset``.
    """

    name = "edst"
    schedule_keys = RigL.schedule_keys + ("num_tickets", "exploration_fraction", "explore_fraction", "lr_reset",
                                          "base_lrs")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, sparsity: float = 0.9,
                 total_steps: int, tickets: int = 3, exploration_fraction: float = 0.5,
                 explore_fraction: float = 0.8, drop_fraction: float = 0.5, update_interval: int = 100,
                 distribution: str = "erk", lr_reset: bool = True, seed: int = 0,
                 include=(nn.Linear, nn.Conv2d), exclude=()) -> None:
        check_int("tickets (the ensemble size M)", tickets, "EDST")
        total_steps = check_int("total_steps", total_steps)
        self.num_tickets = tickets
        self.exploration_fraction = _check_open_fraction("exploration_fraction", exploration_fraction, False, True)
        self.explore_fraction = _check_open_fraction("explore_fraction", explore_fraction, True, False)
        if not isinstance(lr_reset, bool):
            raise TypeError(f"EDST: lr_reset must be a bool, got {type(lr_reset).__name__}")
        self.lr_reset = lr_reset
        self._set_phases(total_steps)
        self.tickets: list[dict] = []
        super().__init__(model, optimizer, sparsity=sparsity, distribution=distribution,
                         update_interval=update_interval, drop_fraction=drop_fraction, t_end=total_steps,
                         total_steps=total_steps, seed=seed, include=include, exclude=exclude)

    def _after_attach(self) -> None:
        self.base_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        self._set_lr(1)

    # ------------------------------------------------------------------ phases
    def _set_phases(self, total_steps: int) -> None:
        refine = int((1.0 - self.exploration_fraction) * total_steps / self.num_tickets)
        if refine < 1:
            raise ValueError(f"EDST: total_steps={total_steps} leaves no step for {self.num_tickets} refinement "
                             f"phases at exploration_fraction={self.exploration_fraction}")
        explore = total_steps - self.num_tickets * refine
        bounds = [(1, explore)] if explore else []
        bounds += [(explore + k * refine + 1, explore + (k + 1) * refine) for k in range(self.num_tickets)]
        # The phases tile the budget exactly: the run costs what one dense run costs.
        assert sum(e - s + 1 for s, e in bounds) == total_steps and bounds[-1][1] == total_steps
        self.phases = bounds              # (first, last) step of each phase, 1-based
        self.exploration_steps = explore
        self.refinement_steps = refine
        self.ticket_steps = tuple(e for _, e in bounds[-self.num_tickets:])

    def phase_of(self, step: int) -> tuple[int, int, int]:
        """(phase index, step within the phase (1-based), phase length) of ``step``; phase 0
        is the exploration phase when there is one."""
        for index, (first, last) in enumerate(self.phases):
            if step <= last:
                return index, step - first + 1, last - first + 1
        first, last = self.phases[-1]
        return len(self.phases) - 1, step - first + 1, last - first + 1

    def _is_refinement(self, index: int) -> bool:
        return self.exploration_steps == 0 or index > 0

    def is_update_step(self, step: int) -> bool:
        if step > self.total_steps:
            return False
        index, local, length = self.phase_of(step)
        if local == 1 and self._is_refinement(index):
            return True  # the refinement phase's global exploration
        return local % self.update_interval == 0 and local <= max(1, int(0.75 * length))

    def fraction(self, step: int) -> float:
        index, local, length = self.phase_of(step)
        if local == 1 and self._is_refinement(index):
            return self.explore_fraction
        return cosine_drop_fraction(local, self.drop_fraction, max(1, int(0.75 * length)))

    def lr_factor(self, step: int) -> float:
        """The multiple of the base learning rate used by optimizer step ``step``."""
        index, local, length = self.phase_of(min(step, self.total_steps))
        if not self._is_refinement(index):
            return 1.0
        return 1.0 if local <= length // 2 else 0.1 if local <= (3 * length) // 4 else 0.01

    def _set_lr(self, step: int) -> None:
        if self.lr_reset:
            factor = self.lr_factor(step)
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * factor

    # ------------------------------------------------------------------ the hook
    def _after_step(self, optimizer, args, kwargs) -> None:
        if self.step >= self.total_steps:
            raise RuntimeError(f"EDST: optimizer step {self.step + 1} is past total_steps={self.total_steps}; the "
                               "tickets are final (EDST's budget is one dense run's)")
        super()._after_step(optimizer, args, kwargs)
        if self.step in self.ticket_steps:
            self.tickets.append(copy.deepcopy(self.model.state_dict()))
        self._set_lr(self.step + 1)

    def update(self, step: int) -> dict:
        record = super().update(step)
        index, local, _ = self.phase_of(step)
        record["phase"] = index
        record["exploration"] = local == 1 and self._is_refinement(index)
        return record

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The base state plus the tickets collected so far (O(nnz) each)."""
        return {**super().state_dict(), "tickets": copy.deepcopy(self.tickets)}

    def _load_extra(self, state: Mapping) -> None:
        tickets = state.get("tickets")
        if not isinstance(tickets, list) or not all(isinstance(t, Mapping) for t in tickets):
            raise ValueError("EDST.load_state_dict: state['tickets'] must be a list of state dicts")
        self.tickets = copy.deepcopy(tickets)

    def _check_schedule(self, schedule: dict) -> None:
        super()._check_schedule(schedule)
        if "total_steps" in schedule:
            check_int("total_steps", schedule["total_steps"])  # EDST's phases need it
        check_int("num_tickets", schedule.get("num_tickets", 1))
        if not isinstance(schedule.get("lr_reset", True), bool):
            raise ValueError(f"lr_reset must be a bool, got {schedule['lr_reset']!r}")
        if "base_lrs" in schedule:
            lrs, groups = schedule["base_lrs"], len(self.optimizer.param_groups)
            if (not isinstance(lrs, list) or len(lrs) != groups
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                               for v in lrs)):
                raise ValueError(f"base_lrs must be a list of {groups} learning rates (one per param group), "
                                 f"got {lrs!r}")
        if "exploration_fraction" in schedule:
            _check_open_fraction("exploration_fraction", schedule["exploration_fraction"], False, True)
        if "explore_fraction" in schedule:
            _check_fraction("explore_fraction", schedule["explore_fraction"])

    def _after_load(self) -> None:
        self._set_phases(self.total_steps)


class DSTEnsemble:
    """DST ensemble (FreeTickets, Liu et al., ICLR 2022): ``members`` independent sparse
    runs, each a real sparse model trained for the full budget with its own seed (model
    initialisation with ``torch.manual_seed(seed + i)``, ERK masks and growth from RigL
    seeded with ``seed + i``), at the paper's defaults: ERK, magnitude drop, gradient
    growth, drop fraction 0.5 with cosine decay.

    Args:
        make_model: ``() -> nn.Module`` (called once per member after seeding torch).
        make_optimizer: ``(params) -> torch.optim.Optimizer``.
        members: M >= 1; ``total_steps``: the steps of each member's run.
        method_kwargs: passed to :class:`RigL` (``update_interval``, ``drop_fraction``,
            ``distribution``, ...).
    Attributes:
        runs: list of (model, optimizer, RigL) per member; train them in any loop, or with
        :meth:`fit`. ``tickets``: the members' state dicts.
    """

    def __init__(self, make_model: Callable[[], nn.Module], make_optimizer: Callable[[Iterable], torch.optim.Optimizer],
                 *, members: int = 3, sparsity: float = 0.9, total_steps: int, seed: int = 0,
                 drop_fraction: float = 0.5, **method_kwargs) -> None:
        check_int("members (the ensemble size M)", members, "DSTEnsemble")
        if isinstance(make_model, nn.Module) or not callable(make_model) or not callable(make_optimizer):
            raise TypeError("DSTEnsemble: make_model and make_optimizer must be callables (make_model returns a new "
                            f"model per member), got {type(make_model).__name__} and {type(make_optimizer).__name__}")
        self.total_steps = check_int("total_steps", total_steps)
        self.runs: list[tuple[nn.Module, torch.optim.Optimizer, RigL]] = []
        for i in range(members):
            torch.manual_seed(seed + i)
            model = make_model()
            optimizer = make_optimizer(model.parameters())
            method = RigL(model, optimizer, sparsity=sparsity, total_steps=self.total_steps, seed=seed + i,
                          drop_fraction=drop_fraction, **method_kwargs)
            self.runs.append((model, optimizer, method))

    @property
    def tickets(self) -> list[dict]:
        """Copies of the members' state dicts (sparse: O(nnz) each)."""
        return [copy.deepcopy(model.state_dict()) for model, _, _ in self.runs]

    def fit(self, loader: Iterable, loss_fn: Callable, progress: bool = True) -> list[float]:
        """Trains every member for ``total_steps`` steps, cycling over ``loader`` (items
        (inputs, targets)); returns each member's last loss. Shows a tqdm bar."""
        from tqdm.auto import tqdm

        losses = []
        bar = tqdm(total=self.total_steps * len(self.runs), desc="DST ensemble", disable=not progress)
        for model, optimizer, method in self.runs:
            model.train()
            loss = None
            while method.step < self.total_steps:
                for x, y in loader:
                    if method.step >= self.total_steps:
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(model(x), y)
                    loss.backward()
                    optimizer.step()
                    bar.update(1)
            losses.append(float(loss.detach()) if loss is not None else float("nan"))
        bar.close()
        return losses

    def state_dict(self) -> dict:
        return {"members": [{"model": m.state_dict(), "optimizer": o.state_dict(), "method": r.state_dict()}
                            for m, o, r in self.runs]}

    def load_state_dict(self, state: Mapping) -> None:
        """Restores a :meth:`state_dict`, all members or none: the entries are checked
        first, and if a member's own load fails the members already loaded go back to
        their previous state."""
        owner = "DSTEnsemble.load_state_dict"
        members = state.get("members") if isinstance(state, Mapping) else None
        if not isinstance(members, list) or len(members) != len(self.runs):
            raise ValueError(f"{owner}: state['members'] must be a list of {len(self.runs)} member states")
        for i, saved in enumerate(members):
            if not isinstance(saved, Mapping) or not all(isinstance(saved.get(k), Mapping)
                                                         for k in ("model", "optimizer", "method")):
                raise ValueError(f"{owner}: member {i} must map 'model', 'optimizer' and 'method' to their state dicts")
        before = [copy.deepcopy(member) for member in self.state_dict()["members"]]
        done = 0
        try:
            for run, saved in zip(self.runs, members):
                done += 1  # counted first: a member that fails halfway is restored too
                _load_member(run, saved)
        except BaseException:
            for run, old in zip(self.runs[:done], before):
                _load_member(run, old)
            raise


def _load_member(run: tuple[nn.Module, torch.optim.Optimizer, RigL], saved: Mapping) -> None:
    model, optimizer, method = run
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    method.load_state_dict(saved["method"])


register_method(EDST)  # get_method("edst"); DSTEnsemble builds M runs from factories, not one method
