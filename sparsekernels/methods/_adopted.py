"""The layouts of the sparse layers a method adopts at construction, kept until its first
``load_state_dict`` or optimizer step.

A trainer callback (Lightning, the Hugging Face Trainer) and ``load_sparse_state_dict``
load a checkpoint's model before the method exists. A method whose set-up changes the
layers it adopts (GaP grows its first group, AC/DC grows every layer and may prune them at
once) had overwritten the checkpoint's layouts: the optimizer state loaded next no longer
fit (Lightning: a size error on the first step) or, with sizes that happened to fit, the
run went on from other weights (the Hugging Face Trainer: silently). The method's
``load_state_dict`` of a step > 0 puts the adopted layouts back, where the layer is still
as the set-up left it (a model loaded after the method was built keeps what it loaded).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..formats import CSR
from ..topology import remap_optimizer_state


@dataclass
class ChangedLayout:
    adopted: CSR   # the layout and values the layer was adopted with (values copied)
    after: Tensor  # the layer's col_idx once set up: the same object at the same version means untouched since
    version: int


def capture(layers: dict[str, nn.Module]) -> dict[str, CSR]:
    """The CSR layouts of ``layers`` with a copy of their values (the set-up may resize the
    same Parameter)."""
    return {n: dataclasses.replace(layer.csr(), values=layer.values.detach().clone())
            for n, layer in layers.items() if hasattr(layer, "set_csr")}


def changed_by_setup(adopted: dict[str, CSR], layers: dict[str, nn.Module]) -> dict[str, ChangedLayout]:
    """The adopted layers whose pattern the set-up replaced."""
    out = {}
    for name, csr in adopted.items():
        layer = layers.get(name)
        if layer is not None and layer.col_idx is not csr.col_idx:
            out[name] = ChangedLayout(csr, layer.col_idx, layer.col_idx._version)
    return out


def _keys(csr: CSR) -> Tensor:
    return csr.rows() * csr.shape[1] + csr.col_idx.long()


@torch.no_grad()
def restore(changed: dict[str, ChangedLayout], layers: dict[str, nn.Module],
            optimizer: torch.optim.Optimizer) -> list[str]:
    """Puts the adopted layouts back on the layers still as the set-up left them; the
    optimizer's per-element state follows where it still has the set-up's size (state
    loaded from the checkpoint has the adopted size already). Returns the names restored."""
    restored = []
    for name, saved in changed.items():
        layer = layers.get(name)
        if layer is None or layer.col_idx is not saved.after or layer.col_idx._version != saved.version:
            continue  # loaded or changed since the set-up: the model's state stands
        now = layer.csr()
        now_keys, old_keys = _keys(now), _keys(saved.adopted)
        pos = torch.searchsorted(now_keys, old_keys).clamp_max(max(now_keys.numel() - 1, 0))
        found = now_keys[pos] == old_keys if now_keys.numel() else torch.zeros_like(old_keys, dtype=torch.bool)
        source = torch.where(found, pos, torch.full_like(pos, -1))
        set_up_nnz = layer.nnz
        layer.set_csr(saved.adopted)
        state = optimizer.state.get(layer.values) or {}
        sizes = {v.numel() for k, v in state.items() if isinstance(v, Tensor) and v.dim() == 1 and k != "step"}
        if set_up_nnz != layer.nnz and sizes == {set_up_nnz}:
            remap_optimizer_state(optimizer, layer.values, source, set_up_nnz)
        restored.append(name)
    return restored
