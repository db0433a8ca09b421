"""Sup-tickets (Yin, Menkovski, Fang, Huang, Pei, Pechenizkiy, Mocanu and Liu, UAI 2022,
"Superposing many tickets into one: a performance booster for sparse neural network
training"): cheap tickets from cyclic-lr phases at the end of one dynamic sparse run,
averaged into one sparse network of the same parameter budget."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..formats import CSR
from ..topology import grow_random
from .batchnorm import recalibrate_batchnorm
from .registry import register_method
from .rigl import RigL
from .schedules import cosine_drop_fraction

AVERAGES = ("cumulative", "cyclic")


def _check_open(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)) \
            or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def _layer_entries(state: Mapping, name: str, n_cols: int) -> tuple[Tensor, Tensor]:
    """(flat keys row * n_cols + col, values) of a sparse layer in a model state dict."""
    row_ptr, col_idx = state[f"{name}.row_ptr"].long(), state[f"{name}.col_idx"].long()
    rows = torch.repeat_interleave(torch.arange(row_ptr.numel() - 1, device=row_ptr.device), row_ptr.diff())
    return rows * n_cols + col_idx, state[f"{name}.values"].detach()


def superpose_states(states: list[Mapping], weights: list[float], layers: Mapping[str, nn.Module],
                     budget: int) -> dict:
    """The weighted average of sparse model state dicts, re-pruned globally by magnitude.

    Each sparse layer's average lives on the union of the states' patterns (a weight
    inactive in a state counts as 0 there); over all layers the ``budget`` largest
    averaged magnitudes are kept (ties to the earlier layer / position), so the result
    has the parameter count of one ticket. Other floating-point entries (biases,
    BatchNorm affine parameters and statistics) are averaged; integer ones are taken from
    the last state. O(M * nnz); no dense weight is formed.

    Returns a state dict loadable into the sparse model (each layer takes its new nnz).
    """
    averaged: dict[str, tuple[Tensor, Tensor]] = {}
    for name, layer in layers.items():
        n_cols = layer.csr().shape[1]
        parts = [_layer_entries(s, name, n_cols) for s in states]
        keys = torch.cat([k for k, _ in parts])
        vals = torch.cat([v.to(torch.float64) * w for (_, v), w in zip(parts, weights)])
        union, inverse = torch.unique(keys, return_inverse=True)
        averaged[name] = (union, torch.zeros(union.numel(), dtype=torch.float64).index_add_(0, inverse, vals))
    mags = torch.cat([v.abs() for _, v in averaged.values()])
    if budget > mags.numel():
        raise ValueError(f"superpose_states: budget {budget} exceeds the union's {mags.numel()} weights")
    # Stable descending sort: equal magnitudes keep the earlier layer / position.
    kept = torch.zeros(mags.numel(), dtype=torch.bool)
    kept[torch.sort(mags, descending=True, stable=True).indices[:budget]] = True
    out = {k: v for k, v in states[-1].items()}
    for key, value in states[-1].items():
        if isinstance(value, Tensor) and value.is_floating_point() and not any(
                key == f"{n}.values" for n in layers):
            out[key] = sum(s[key].to(torch.float64) * w for s, w in zip(states, weights)).to(value.dtype)
    offset = 0
    for name, layer in layers.items():
        union, values = averaged[name]
        keep = kept[offset:offset + union.numel()]
        offset += union.numel()
        n_rows, n_cols = layer.csr().shape
        keys = union[keep]
        csr = CSR.from_indices(values[keep].to(layer.values.dtype), keys // n_cols, keys % n_cols, (n_rows, n_cols),
                               check=False)
        for attr, tensor in zip(("row_ptr", "col_idx", "t_row_ptr", "t_col_idx", "t_perm"), csr.pattern()):
            out[f"{name}.{attr}"] = tensor
        out[f"{name}.values"] = csr.values
    return out


class SupTickets(RigL):
    """Sup-tickets (Yin et al., UAI 2022) on the real sparse layers.

    Phase 1, the first ``total_steps - cycles * L`` steps: dynamic sparse training, RigL
    (``explore="rigl"``: magnitude drop, gradient growth) or SET (``explore="set"``:
    random growth), with ERK densities and drop fraction ``drop_fraction`` = 0.5 decayed by
    a cosine until 75% of the phase, one update every ``update_interval`` steps; the lr is
    the caller's. Phase 2, the last ``cycle_fraction`` of the steps: ``cycles`` cycles of
    L = floor(cycle_fraction * total_steps / cycles) steps. Each cycle starts (after its
    first step) with a mask re-exploration (``reexplore_fraction`` of every layer's active
    weights dropped by magnitude, as many regrown by the phase-1 rule) and runs a
    triangular learning rate lr1 -> lr2 -> lr1 (linear; ``lr1`` at both ends, ``lr2`` at
    mid-cycle; the method sets the lr of every param group through phase 2). The model at
    each cycle's end is a cheap ticket.

    Superposition: ``average="cumulative"`` (CAA) averages all cycle-end tickets with
    equal weights; ``"cyclic"`` averages each new ticket with the previous superposed
    ticket (weights 1/2, 1/2), re-pruning after every cycle. The average lives on the union
    of the tickets' masks and is re-pruned globally by magnitude to the nnz of one ticket
    (:func:`superpose_states`). :meth:`superpose` returns that model (BatchNorm statistics
    recomputed on a loader); training continues from the current ticket, untouched.

    Defaults: ``cycle_fraction`` = 0.25, ``cycles`` = 4, ``reexplore_fraction`` = 0.05,
    lr1 = 0.1 x and lr2 = 1 x the learning rate at attach time. The paper tunes the cycle
    count and learning rates per dataset; these are the settings measured here on digits
    (a larger re-exploration dilutes the average: a weight active in one ticket of M
    enters it at 1/M).
    """

    name = "suptickets"
    schedule_keys = RigL.schedule_keys + ("cycle_fraction", "cycles", "lr1", "lr2", "explore", "average",
                                          "reexplore_fraction")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, sparsity: float = 0.9,
                 total_steps: int, cycle_fraction: float = 0.25, cycles: int = 4, lr1: float | None = None,
                 lr2: float | None = None, explore: str = "rigl", average: str = "cumulative",
                 drop_fraction: float = 0.5, reexplore_fraction: float = 0.05, update_interval: int = 100,
                 distribution: str = "erk", seed: int = 0, include=(nn.Linear, nn.Conv2d), exclude=()) -> None:
        total_steps = check_int("total_steps", total_steps)
        self.cycle_fraction = _check_open("cycle_fraction", cycle_fraction)
        self.cycles = check_int("cycles", cycles)
        self.reexplore_fraction = _check_open("reexplore_fraction", reexplore_fraction)
        if explore not in ("rigl", "set"):
            raise ValueError(f"SupTickets: explore must be 'rigl' or 'set', got {explore!r}")
        if average not in AVERAGES:
            raise ValueError(f"SupTickets: average must be one of {AVERAGES}, got {average!r}")
        for name, lr in (("lr1", lr1), ("lr2", lr2)):
            if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0):
                raise ValueError(f"SupTickets: {name} must be a number >= 0 or None, got {lr!r}")
        self.explore, self.average = explore, average
        self.lr1, self.lr2 = lr1, lr2
        self._set_cycles(total_steps)
        self.tickets: list[dict] = []
        self.superposed: dict | None = None  # the running superposed ticket ("cyclic")
        self.needs_gradient = explore == "rigl"  # SET growth needs no captured activations
        super().__init__(model, optimizer, sparsity=sparsity, distribution=distribution,
                         update_interval=update_interval, drop_fraction=drop_fraction, t_end=total_steps,
                         total_steps=total_steps, seed=seed, include=include, exclude=exclude)

    def _after_attach(self) -> None:
        base = float(self.optimizer.param_groups[0]["lr"])
        self.lr1 = 0.1 * base if self.lr1 is None else float(self.lr1)
        self.lr2 = base if self.lr2 is None else float(self.lr2)
        self.budget = sum(layer.nnz for layer in self.layers.values())

    def _set_cycles(self, total_steps: int) -> None:
        length = int(self.cycle_fraction * total_steps / self.cycles)
        if length < 2:
            raise ValueError(f"SupTickets: total_steps={total_steps} gives cycles of {length} step(s) at "
                             f"cycle_fraction={self.cycle_fraction} and cycles={self.cycles}; need >= 2")
        self.cycle_length = length
        self.phase1_steps = total_steps - self.cycles * length
        self.ticket_steps = tuple(self.phase1_steps + (k + 1) * length for k in range(self.cycles))

    def cycle_of(self, step: int) -> tuple[int, int] | None:
        """(cycle index, step within the cycle, 1-based) in phase 2, None in phase 1."""
        if step <= self.phase1_steps:
            return None
        offset = step - self.phase1_steps - 1
        return min(offset // self.cycle_length, self.cycles - 1), offset % self.cycle_length + 1

    def is_update_step(self, step: int) -> bool:
        where = self.cycle_of(step)
        if where is not None:
            return where[1] == 1 and step <= self.total_steps
        t_end = max(1, int(0.75 * self.phase1_steps))
        return step % self.update_interval == 0 and step <= t_end

    def fraction(self, step: int) -> float:
        if self.cycle_of(step) is not None:
            return self.reexplore_fraction
        return cosine_drop_fraction(step, self.drop_fraction, max(1, int(0.75 * self.phase1_steps)))

    def grow(self, name: str, layer, n: int, keep: Tensor, step: int, index: int):
        if self.explore == "rigl":
            return super().grow(name, layer, n, keep, step, index)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step * 1_009 + index) % (2**63))
        rows, cols = grow_random(layer, n, generator, keep)
        return rows, cols, None

    def plan(self, step: int) -> dict[str, tuple[int, int]]:
        if self.explore == "rigl":
            return super().plan(step)
        f = self.fraction(step)
        return {name: (int(f * layer.nnz),) * 2 for name, layer in self.layers.items()}

    def update(self, step: int) -> dict:
        if self.explore == "rigl":
            return super().update(step)
        return super(RigL, self).update(step)  # SET growth: no captured activations to gather

    def lr_at(self, step: int) -> float | None:
        """The learning rate of optimizer step ``step`` in phase 2 (None in phase 1)."""
        where = self.cycle_of(step)
        if where is None:
            return None
        t = (where[1] - 1) / self.cycle_length  # 0 at the cycle's first step
        return self.lr1 + (self.lr2 - self.lr1) * (1.0 - abs(2.0 * t - 1.0)) if t > 0 else self.lr1

    # ------------------------------------------------------------------ the hook
    def _after_step(self, optimizer, args, kwargs) -> None:
        super()._after_step(optimizer, args, kwargs)
        if self.step in self.ticket_steps:
            ticket = copy.deepcopy(self.model.state_dict())
            self.tickets.append(ticket)
            if self.average == "cyclic":
                self.superposed = ticket if self.superposed is None else superpose_states(
                    [self.superposed, ticket], [0.5, 0.5], self.layers, self.budget)
        lr = self.lr_at(self.step + 1)
        if lr is not None and self.step < self.total_steps:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    @torch.no_grad()
    def superpose(self, loader: Iterable | None = None, num_batches: int | None = None) -> nn.Module:
        """A new model (a copy of the sparse model) holding the superposed ticket,
        re-pruned to one ticket's nnz; BatchNorm statistics recomputed on ``loader``
        (inputs or (inputs, targets) batches) when given. The training model is unchanged.

        Raises RuntimeError before the first cycle-end ticket."""
        if not self.tickets:
            raise RuntimeError(f"SupTickets.superpose: no ticket yet (the first is taken at step "
                               f"{self.ticket_steps[0]}, this is step {self.step})")
        if self.average == "cyclic":
            state = self.superposed
        else:
            state = superpose_states(self.tickets, [1.0 / len(self.tickets)] * len(self.tickets), self.layers,
                                     self.budget)
        model = copy.deepcopy(self.model)
        for layer in model.modules():
            if hasattr(layer, "capture_next"):
                layer.capture_next(False)
        model.load_state_dict(state)
        if loader is not None:
            recalibrate_batchnorm(model, loader, num_batches)
        return model

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {**super().state_dict(), "tickets": copy.deepcopy(self.tickets),
                "superposed": copy.deepcopy(self.superposed), "budget": self.budget}

    def _load_extra(self, state: Mapping) -> None:
        tickets, superposed, budget = state.get("tickets"), state.get("superposed"), state.get("budget")
        if not isinstance(tickets, list) or not all(isinstance(t, Mapping) for t in tickets):
            raise ValueError("SupTickets.load_state_dict: state['tickets'] must be a list of state dicts")
        if superposed is not None and not isinstance(superposed, Mapping):
            raise ValueError("SupTickets.load_state_dict: state['superposed'] must be None or a state dict")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError("SupTickets.load_state_dict: state lacks the non-negative int 'budget'")
        self.tickets, self.superposed, self.budget = copy.deepcopy(tickets), copy.deepcopy(superposed), budget

    def _check_schedule(self, schedule: dict) -> None:
        super()._check_schedule(schedule)
        if "total_steps" in schedule:
            check_int("total_steps", schedule["total_steps"])  # the cycles need it
        if "cycle_fraction" in schedule:
            _check_open("cycle_fraction", schedule["cycle_fraction"])
        if "cycles" in schedule:
            check_int("cycles", schedule["cycles"])
        if "reexplore_fraction" in schedule:
            _check_open("reexplore_fraction", schedule["reexplore_fraction"])
        if schedule.get("average", "cumulative") not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {schedule['average']!r}")
        if schedule.get("explore", "rigl") not in ("rigl", "set"):
            raise ValueError(f"explore must be 'rigl' or 'set', got {schedule['explore']!r}")
        for key in ("lr1", "lr2"):
            v = schedule.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v < 0):
                raise ValueError(f"{key} must be None or a learning rate >= 0, got {v!r}")

    def _after_load(self) -> None:
        self._set_cycles(self.total_steps)
        self.needs_gradient = self.explore == "rigl"


register_method(SupTickets)
