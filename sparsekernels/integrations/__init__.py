"""Integrations with trainers and checkpoints.

``checkpoint`` (sparse state dicts into dense-constructed models, compact safetensors
files) is imported with the package. The trainer callbacks (``lightning``, ``hf``) import
their frameworks, so they load on first access (``sparsekernels.integrations.lightning``)
and never at ``import sparsekernels``.
"""

from __future__ import annotations

import importlib

from .checkpoint import load, load_sparse_state_dict, save

_LAZY = ("lightning", "hf")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["load_sparse_state_dict", "save", "load"]
