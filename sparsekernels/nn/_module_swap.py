"""Putting a new module in place of one of a model's submodules, under every name it has.

A module may be registered under several names (``nn.ModuleList([block] * 6)``, a layer
assigned to two parents): it is one module that the model runs at each of them. Swapping
it under one name only would split it in two, the old module still running at the other
names. Every swap of a layer for its sparse twin (``sparsify``, the training methods, the
one-shot pruners, their rollbacks) goes through :func:`swap_module`, so such a layer
stays one layer.
"""

from __future__ import annotations

from collections import defaultdict

from torch import nn


def names_by_module(root: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every name it is registered under in ``root`` ("" for ``root``), in
    ``named_modules()`` order. Code that picks a layer's entries of ``root.state_dict()``
    by name needs them all: the state dict holds a shared layer under each name."""
    names = defaultdict(list)
    for name, module in root.named_modules(remove_duplicate=False):
        names[id(module)].append(name)
    return dict(names)


def registrations(root: nn.Module, module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every place ``module`` is registered inside ``root`` (``root``
    itself is not a registration)."""
    found, seen = [], set()
    stack = [root]
    while stack:
        parent = stack.pop()
        if id(parent) in seen:  # a parent registered twice holds its children once
            continue
        seen.add(id(parent))
        for attr, child in parent._modules.items():
            if child is None:
                continue
            if child is module:
                found.append((parent, attr))
            else:
                stack.append(child)
    return found


def swap_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` in place of ``root``'s submodule ``name`` ("a.b.c", as in
    ``named_modules()``; not "") wherever that module is registered in ``root``, so a
    module registered under several names is replaced under all of them by the one
    ``new``."""
    if not name:
        raise ValueError("swap_module: name must name a submodule, not the model itself")
    old = root.get_submodule(name)
    for parent, attr in registrations(root, old):
        setattr(parent, attr, new)
