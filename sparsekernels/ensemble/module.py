"""An ensemble of (sparse) models whose prediction is the mean of the members' softmax
probabilities; built from models or from tickets (sparse state dicts)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .metrics import metrics, pairwise_disagreement


class Ensemble(nn.Module):
    """``forward(x)`` = mean over members of ``softmax(member(x), dim=-1)``.

    Members are held as they are: sparse members keep their compressed weights, so an
    ensemble of M tickets costs O(M * nnz) memory.

    Args:
        models: a non-empty iterable of ``nn.Module`` classifiers returning logits [N, C].
    Shapes: x as the members take it -> probabilities [N, C] (rows sum to 1).
    """

    def __init__(self, models: Iterable[nn.Module]) -> None:
        super().__init__()
        if isinstance(models, nn.Module):
            raise TypeError("Ensemble: models must be an iterable of nn.Module, got a single module; wrap it "
                            "in a list")
        try:
            models = list(models)
        except TypeError:
            raise TypeError(f"Ensemble: models must be an iterable of nn.Module, got {type(models).__name__}") from None
        if not models:
            raise ValueError("Ensemble: models must hold at least one model")
        for i, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise TypeError(f"Ensemble: models[{i}] must be an nn.Module, got {type(m).__name__}")
        self.members = nn.ModuleList(models)

    @classmethod
    def from_tickets(cls, template: nn.Module | Callable[[], nn.Module], tickets: Iterable[Mapping]) -> "Ensemble":
        """One member per ticket: a copy of ``template`` (or a fresh ``template()``) with
        the ticket loaded (``load_state_dict``, strict).

        ``template`` must have the tickets' layer types: the sparse model the tickets came
        from (e.g. ``edst.model``); a sparse layer takes a ticket's pattern and nnz
        whatever its own, so the members' masks are the tickets'."""
        try:
            tickets = list(tickets)
        except TypeError:
            raise TypeError(f"Ensemble.from_tickets: tickets must be an iterable of state dicts, got "
                            f"{type(tickets).__name__}") from None
        if not tickets:
            raise ValueError("Ensemble.from_tickets: tickets must hold at least one state dict")
        if not isinstance(template, nn.Module) and not callable(template):
            raise TypeError("Ensemble.from_tickets: template must be an nn.Module or a callable returning one, "
                            f"got {type(template).__name__}")
        members = []
        for i, ticket in enumerate(tickets):
            if not isinstance(ticket, Mapping):
                raise TypeError(f"Ensemble.from_tickets: tickets[{i}] must be a state dict, got "
                                f"{type(ticket).__name__}")
            member = copy.deepcopy(template) if isinstance(template, nn.Module) else template()
            if not isinstance(member, nn.Module):
                raise TypeError(f"Ensemble.from_tickets: template() returned {type(member).__name__}, not an "
                                "nn.Module")
            member.load_state_dict(ticket)
            members.append(member)
        return cls(members)

    def member_probs(self, x) -> Tensor:
        """[M, N, C]: every member's softmax probabilities."""
        probs = [torch.softmax(m(x), dim=-1) for m in self.members]
        shapes = {tuple(p.shape) for p in probs}
        if len(shapes) > 1:
            raise ValueError(f"Ensemble: the members' outputs differ in shape {sorted(shapes)}; members must be "
                             "classifiers over the same classes")
        return torch.stack(probs)

    def forward(self, x) -> Tensor:
        return self.member_probs(x).mean(dim=0)

    @torch.no_grad()
    def evaluate(self, inputs, targets: Tensor, n_bins: int = 15) -> dict:
        """Metrics of the ensemble and of every member on (inputs, targets), in eval mode.

        Returns ``{"ensemble": {accuracy, nll, ece}, "members": [{...} per member],
        "disagreement": mean pairwise disagreement of the members}``."""
        modes = [m.training for m in self.modules()]
        self.eval()
        try:
            probs = self.member_probs(inputs)
        finally:
            for m, mode in zip(self.modules(), modes):
                m.training = mode
        return {"ensemble": metrics(probs.mean(dim=0), targets, n_bins),
                "members": [metrics(p, targets, n_bins) for p in probs],
                "disagreement": pairwise_disagreement(probs)}
