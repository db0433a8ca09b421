"""sparsify(model) / densify(model): swap nn.Linear / nn.Conv2d for their sparse twins."""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Iterable

from torch import nn

from ..formats import check_sparsity
from .conv import SparseConv2d
from .distribution import layer_sparsities
from .linear import SparseLinear

_SPARSE_OF = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}


def _excluded(name: str, module: nn.Module, exclude: Iterable) -> bool:
    for rule in exclude:
        if isinstance(rule, type) and isinstance(module, rule):
            return True
        if isinstance(rule, str) and (name == rule or fnmatch.fnmatchcase(name, rule)):
            return True
    return False


def _sparse_class(module: nn.Module, include: tuple[type, ...]) -> type | None:
    if isinstance(module, (SparseLinear, SparseConv2d)) or not isinstance(module, include):
        return None
    # MultiheadAttention reads out_proj.weight directly (a NonDynamicallyQuantizableLinear),
    # so swapping it would break attention: leave it dense.
    if type(module).__name__ == "NonDynamicallyQuantizableLinear":
        return None
    for dense_cls, sparse_cls in _SPARSE_OF.items():
        if isinstance(module, dense_cls):
            return sparse_cls
    return None


def _replace(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
    return root


def eligible_layers(model: nn.Module, include=(nn.Linear, nn.Conv2d), exclude=()) -> dict[str, nn.Module]:
    """The layers :func:`sparsify` would swap, by their ``named_modules()`` name."""
    include = tuple(include)
    for cls in include:
        if cls not in _SPARSE_OF:
            raise ValueError(f"sparsify: include may hold nn.Linear and nn.Conv2d, got {cls!r}")
    if isinstance(exclude, (str, type)):
        exclude = (exclude,)
    return {name: m for name, m in model.named_modules()
            if _sparse_class(m, include) is not None and not _excluded(name, m, exclude)}


def sparsify(model: nn.Module, sparsity: float = 0.9, *, distribution: str = "uniform",
             include=(nn.Linear, nn.Conv2d), exclude=(), inplace: bool = True, format: str = "csr",
             block_size: int = 32) -> nn.Module:
    """Replaces the model's ``nn.Linear`` / ``nn.Conv2d`` layers by ``SparseLinear`` /
    ``SparseConv2d`` keeping each layer's largest-magnitude weights.

    Args:
        sparsity: overall fraction of zeros over the swapped layers, in [0, 1).
        distribution: ``"uniform"`` (each layer at ``sparsity``) or ``"erk"``
            (see :func:`sparsekernels.nn.layer_sparsities`).
        include: layer types to swap (subclasses included).
        exclude: module names as in ``model.named_modules()`` (exact or glob patterns such
            as ``"head.*"``) and/or module types to leave dense.
        inplace: modify ``model`` (default) or a deep copy of it.
        format: ``"csr"`` (unstructured), ``"bsr"`` (``block_size`` blocks, largest-norm
            blocks kept; Linear layers only) or ``"2:4"`` (2:4 magnitude mask, fixed;
            Linear layers only, ``sparsity`` ignored). Layers whose shape the format cannot
            hold are left dense with a warning naming them.
    Returns:
        The model (a new module when ``model`` itself is a swapped layer).
    """
    sparsity = check_sparsity(sparsity)
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify: model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    layers = eligible_layers(model, include, exclude)
    if format not in ("csr", "bsr", "2:4"):
        raise ValueError(f"sparsify: format must be 'csr', 'bsr' or '2:4', got {format!r}")
    if format != "csr":
        return _sparsify_structured(model, layers, sparsity, format, block_size)
    per_layer = layer_sparsities({n: tuple(m.weight.shape) for n, m in layers.items()}, sparsity, distribution)
    for name, module in layers.items():
        sparse = _sparse_class(module, tuple(include)).from_dense(module, sparsity=per_layer[name])
        model = _replace(model, name, sparse)
    return model


def _sparsify_structured(model: nn.Module, layers: dict, sparsity: float, format: str, block_size: int) -> nn.Module:
    from .bsr_linear import BSRLinear
    from .sparse24_linear import Sparse24Linear

    skipped = []
    for name, module in layers.items():
        if not isinstance(module, nn.Linear):
            skipped.append(f"{name} ({type(module).__name__})")
            continue
        out_f, in_f = module.weight.shape
        if format == "2:4" and in_f % 4 == 0:
            model = _replace(model, name, Sparse24Linear.from_dense(module))
        elif format == "bsr" and in_f % block_size == 0 and out_f % block_size == 0:
            model = _replace(model, name, BSRLinear.from_dense(module, sparsity=sparsity, block_size=block_size))
        else:
            skipped.append(f"{name} ({out_f}x{in_f})")
    if skipped:
        need = "in_features divisible by 4" if format == "2:4" else f"both dimensions divisible by {block_size}"
        warnings.warn(f"sparsify(format={format!r}): left dense, as the format needs nn.Linear with {need}: "
                      + ", ".join(skipped), stacklevel=3)
    return model


def densify(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Replaces every sparse layer (``SparseLinear``, ``SparseConv2d``, ``BSRLinear``,
    ``Sparse24Linear``) by the equivalent dense layer (zeros where pruned). Exact inverse
    of :func:`sparsify`'s swap."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"densify: model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    from .bsr_linear import BSRLinear
    from .sparse24_linear import Sparse24Linear

    swapped = (SparseLinear, SparseConv2d, BSRLinear, Sparse24Linear)
    sparse = [(n, m) for n, m in model.named_modules() if isinstance(m, swapped)]
    for name, module in sparse:
        model = _replace(model, name, module.to_dense())
    return model
