"""sparsify(model) / densify(model): swap dense layers for their sparse twins and back.

This module is the one map between a dense layer and its sparse twin:

* ``nn.Linear`` <-> :class:`SparseLinear` (or ``BSRLinear`` / ``Sparse24Linear`` by format);
* transformers ``Conv1D`` (weight stored transposed, [in, out]) <-> :class:`SparseLinear`
  on W^T [out, in], restored as the same Conv1D class by :func:`densify`;
* ``nn.Conv2d`` <-> :class:`SparseConv2d`.

Layers that look eligible but are left dense on purpose (a weight Parameter shared with
another module, i.e. tied weights; MultiheadAttention's ``out_proj``, whose weight the
attention reads directly; Linear-like layers of classes this module does not know) are
named in one warning.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections import defaultdict
from collections.abc import Iterable

from torch import nn

from ..formats import check_sparsity
from ..formats.bsr import check_block_size
from ._conv1d import build_conv1d, is_conv1d, is_conv1d_class
from ._module_swap import names_by_module, swap_module
from .bsr_linear import BSRLinear
from .conv import SparseConv2d
from .distribution import layer_sparsities
from ._sparse_weight import carry_flags
from .linear import SparseLinear
from .sparse24_linear import Sparse24Linear

# Dense class -> sparse twin. transformers' Conv1D (a linear layer) maps to SparseLinear too;
# it is looked up lazily (``_conv1d``) so transformers stays optional.
_SPARSE_OF = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}
SPARSE_LAYERS = (SparseLinear, SparseConv2d, BSRLinear, Sparse24Linear)
DEFAULT_INCLUDE = (nn.Linear, nn.Conv2d)


def _excluded(name: str, module: nn.Module, exclude: Iterable) -> bool:
    for rule in exclude:
        if isinstance(rule, type) and isinstance(module, rule):
            return True
        if isinstance(rule, str) and (name == rule or fnmatch.fnmatchcase(name, rule)):
            return True
    return False


def _included(module: nn.Module, include: tuple) -> bool:
    """``include`` holds nn.Linear, nn.Conv2d and/or transformers' Conv1D; nn.Linear covers
    Conv1D as well (it is a linear layer and becomes a SparseLinear)."""
    if isinstance(module, include):
        return True
    return is_conv1d(module) and any(cls is nn.Linear or is_conv1d_class(cls) for cls in include)


def _sparse_class(module: nn.Module, include: tuple[type, ...]) -> type | None:
    """The sparse twin class of ``module`` if its kind is in ``include`` (None if not, if it
    is already sparse, or if it must stay dense whatever the model)."""
    if isinstance(module, SPARSE_LAYERS) or not _included(module, include):
        return None
    # MultiheadAttention reads out_proj.weight directly (a NonDynamicallyQuantizableLinear),
    # so swapping it would break attention: leave it dense.
    if type(module).__name__ == "NonDynamicallyQuantizableLinear":
        return None
    if is_conv1d(module):
        return SparseLinear
    for dense_cls, sparse_cls in _SPARSE_OF.items():
        if isinstance(module, dense_cls):
            return sparse_cls
    return None


def sparse_class_for(module: nn.Module) -> type | None:
    """The sparse class :func:`sparsify` builds for the dense layer ``module``
    (``SparseLinear`` for ``nn.Linear`` and transformers ``Conv1D``, ``SparseConv2d`` for
    ``nn.Conv2d``), or None when ``module`` is not a layer it converts. Its ``from_dense``
    takes ``module`` (a mask in the nn.Linear orientation [out, in] for a Conv1D)."""
    return _sparse_class(module, DEFAULT_INCLUDE + _conv1d_include())


def _conv1d_include() -> tuple:
    from ._conv1d import conv1d_class

    cls = conv1d_class()
    return (cls,) if cls is not None else ()


def linear_weight(module: nn.Module):
    """A dense layer's weight in the orientation of its sparse twin: [out, in] for
    ``nn.Linear`` and Conv1D (whose stored weight [in, out] is transposed, as a view),
    [out, in/g, kh, kw] for ``nn.Conv2d``."""
    return module.weight.t() if is_conv1d(module) else module.weight


def dense_twin(layer: nn.Module) -> nn.Module:
    """The dense layer equivalent to the sparse ``layer`` (zeros where pruned): its
    ``to_dense()``, or the transformers Conv1D it was built from (same class)."""
    origin = getattr(layer, "dense_origin", None)
    if origin is not None:
        dense = layer.to_dense()
        return carry_flags(layer, build_conv1d(origin, dense.weight.detach(),
                                               None if dense.bias is None else dense.bias.detach(), layer.training))
    return layer.to_dense()


def _replace(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """``root`` with ``new`` in place of its submodule ``name`` (under every name that
    module has), or ``new`` itself when ``name`` is "" (the model is the layer)."""
    if name == "":
        return new
    swap_module(root, name, new)
    return root


def _check_include(include) -> tuple:
    if isinstance(include, type):
        include = (include,)  # one layer type on its own
    if isinstance(include, (str, bytes)) or not isinstance(include, Iterable):
        raise TypeError(f"sparsify: include must be a layer type or an iterable of them (nn.Linear, nn.Conv2d, "
                        f"transformers' Conv1D), got {include!r}")
    include = tuple(include)
    for cls in include:
        if cls not in _SPARSE_OF and not is_conv1d_class(cls):
            raise ValueError(f"sparsify: include may hold nn.Linear, nn.Conv2d and transformers' Conv1D, got {cls!r}")
    return include


def _module_names(model: nn.Module) -> tuple[dict[int, list[tuple[str, nn.Module]]], dict[int, list[str]]]:
    """(id(Parameter) -> every ("module.param" name, module) holding it, id(module) -> every name
    it is registered under). A module registered under several names is one layer (it is
    swapped under all of them), so only another module holding its Parameter ties it."""
    holders = defaultdict(list)
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod._parameters.items():
            if p is not None:
                holders[id(p)].append((f"{mod_name}.{p_name}" if mod_name else p_name, mod))
    return holders, names_by_module(model)


def _looks_linear(module: nn.Module) -> bool:
    """A layer of an unknown class that holds a 2-D ``weight`` Parameter and calls itself a
    linear layer (``in_features`` / ``out_features``, or "Linear" in its class name)."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return False
    w = module._parameters.get("weight")
    if w is None or w.dim() != 2:
        return False
    return (isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)) \
        or "linear" in type(module).__name__.lower()


def _scan(model: nn.Module, include, exclude) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(layers to swap, layers left dense on purpose -> why), by ``named_modules()`` name."""
    include = _check_include(include)
    if isinstance(exclude, (str, type)):
        exclude = (exclude,)
    if not isinstance(exclude, Iterable) or not all(isinstance(r, (str, type)) for r in exclude):
        raise TypeError(f"exclude must be module names / glob patterns (str) and/or module types, or an iterable of "
                        f"them, got {exclude!r}")
    exclude = tuple(exclude)
    holders, names = _module_names(model)
    swap, left = {}, {}
    for name, m in model.named_modules():
        # A module excluded under any of its names stays dense under all of them.
        if isinstance(m, SPARSE_LAYERS) or any(_excluded(n, m, exclude) for n in names[id(m)]):
            continue
        if _sparse_class(m, include) is None:
            if not _included(m, include):
                if nn.Linear in include and _looks_linear(m):
                    left[name] = f"{type(m).__name__}: a Linear-like layer of a class sparsify does not convert"
            elif type(m).__name__ == "NonDynamicallyQuantizableLinear":
                left[name] = "MultiheadAttention's out_proj: the attention reads its weight directly"
            continue
        shared = []
        for attr in ("weight", "bias"):
            p = m._parameters.get(attr)
            if p is not None:
                shared += [held for held, other in holders[id(p)] if other is not m]
        if shared:
            left[name] = (f"its parameters are shared with {', '.join(shared)} (tied weights): a sparse twin "
                          "would untie them")
            continue
        swap[name] = m
    return swap, left


def eligible_layers(model: nn.Module, include=DEFAULT_INCLUDE, exclude=()) -> dict[str, nn.Module]:
    """The layers :func:`sparsify` would swap, by their ``named_modules()`` name (a layer
    registered under several names is listed once, by its first; it is swapped under all
    of them)."""
    return _scan(model, include, exclude)[0]


def left_dense_layers(model: nn.Module, include=DEFAULT_INCLUDE, exclude=()) -> dict[str, str]:
    """Layers that look eligible but that :func:`sparsify` (and the methods) leave dense,
    name -> why: tied weights, MultiheadAttention's ``out_proj``, Linear-like layers of
    unknown classes. Layers the user excluded are not listed."""
    return _scan(model, include, exclude)[1]


def warn_left_dense(owner: str, left: dict[str, str], stacklevel: int = 2) -> None:
    """One warning naming every layer of ``left`` (from :func:`left_dense_layers`); none if
    it is empty."""
    if left:
        warnings.warn(f"{owner}: left dense: " + "; ".join(f"{n} ({why})" for n, why in left.items()),
                      stacklevel=stacklevel + 1)


def sparsify(model: nn.Module, sparsity: float = 0.9, *, distribution: str = "uniform",
             include=DEFAULT_INCLUDE, exclude=(), inplace: bool = True, format: str = "csr",
             block_size: int = 32) -> nn.Module:
    """Replaces the model's ``nn.Linear`` / transformers ``Conv1D`` / ``nn.Conv2d`` layers by
    ``SparseLinear`` / ``SparseConv2d`` keeping each layer's largest-magnitude weights.

    A Conv1D (GPT-2's projections: ``y = x @ W + b``, W stored [in, out]) becomes a
    ``SparseLinear`` on W^T; :func:`densify` gives the Conv1D back. A layer whose weight or
    bias Parameter is shared with another module (tied weights, e.g. GPT-2's ``lm_head`` and
    its input embedding) is left dense, so the tie holds; it is named in one warning with
    the other layers left dense on purpose (see :func:`left_dense_layers`). One layer
    registered under several names (``nn.ModuleList([block] * 6)``) becomes one sparse
    layer under all of them; excluding any of its names leaves it dense.

    Args:
        sparsity: overall fraction of zeros over the swapped layers, in [0, 1).
        distribution: ``"uniform"`` (each layer at ``sparsity``) or ``"erk"``
            (see :func:`sparsekernels.nn.layer_sparsities`).
        include: layer types to swap (subclasses included): ``nn.Linear`` (which covers
            Conv1D too), ``nn.Conv2d`` and/or transformers' ``Conv1D`` alone.
        exclude: module names as in ``model.named_modules()`` (exact or glob patterns such
            as ``"head.*"``) and/or module types to leave dense.
        inplace: modify ``model`` (default) or a deep copy of it.
        format: ``"csr"`` (unstructured), ``"bsr"`` (``block_size`` blocks, largest-norm
            blocks kept; linear layers only) or ``"2:4"`` (2:4 magnitude mask, fixed;
            linear layers only, ``sparsity`` ignored). Layers whose shape the format cannot
            hold are left dense with a warning naming them.
    Returns:
        The model (a new module when ``model`` itself is a swapped layer).
    """
    sparsity = check_sparsity(sparsity)
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify: model must be an nn.Module, got {type(model).__name__}")
    if format not in ("csr", "bsr", "2:4"):
        raise ValueError(f"sparsify: format must be 'csr', 'bsr' or '2:4', got {format!r}")
    if not isinstance(inplace, bool):
        raise TypeError(f"sparsify: inplace must be a bool, got {inplace!r}")
    if format == "bsr":
        check_block_size(block_size, "sparsify")
    include = _check_include(include)
    if not inplace:
        model = copy.deepcopy(model)
    layers, left = _scan(model, include, exclude)
    warn_left_dense("sparsify", left, stacklevel=2)
    _warn_kept_as_they_are(model, layers, sparsity, distribution, format)
    _warn_hooks_not_carried(layers)
    if format != "csr":
        return _sparsify_structured(model, layers, sparsity, format, block_size)
    per_layer = layer_sparsities({n: tuple(linear_weight(m).shape) for n, m in layers.items()}, sparsity,
                                 distribution)
    for name, module in layers.items():
        sparse = _sparse_class(module, include).from_dense(module, sparsity=per_layer[name])
        model = _replace(model, name, sparse)
    return model


def _warn_kept_as_they_are(model: nn.Module, layers: dict, sparsity: float, distribution: str, format: str) -> None:
    """Says when sparsify changes nothing a caller may expect it to: the model has no layer
    to swap, or holds sparse layers already, which it leaves as they are (their sparsity
    and format, not the requested ones), named with their sparsity."""
    kinds = {"csr": (SparseLinear, SparseConv2d), "bsr": (BSRLinear,), "2:4": (Sparse24Linear,)}[format]
    kept, sparse_ones = [], 0
    for name, m in model.named_modules():
        if isinstance(m, SPARSE_LAYERS):
            sparse_ones += 1
            same = (isinstance(m, kinds) and (format == "2:4" or distribution != "uniform"
                                              or abs(m.sparsity - sparsity) < 0.005))
            if not same:
                kept.append(f"{name or type(m).__name__} ({type(m).__name__}, sparsity {m.sparsity:.3f})")
    if kept:
        warnings.warn(f"sparsify: {len(kept)} layer(s) are sparse already and stay as they are, not at the requested "
                      f"format {format!r} / sparsity {sparsity}: {', '.join(kept)}; densify(model) first to "
                      "sparsify them again", stacklevel=3)
    elif not layers and not sparse_ones:
        warnings.warn("sparsify: the model has no layer to swap (nn.Linear, transformers' Conv1D, nn.Conv2d, as "
                      "include allows); it is returned unchanged", stacklevel=3)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _warn_hooks_not_carried(layers: dict) -> None:
    """Names the swapped layers that had hooks or parametrizations (weight_norm, ...): the
    sparse layers are new modules and do not run them (a hook may read ``.weight``, which
    they do not have; a parametrization's weight is taken as it computes now)."""
    from torch.nn.utils import parametrize

    named = [name for name, m in layers.items()
             if any(getattr(m, d, None) for d in _HOOK_DICTS) or parametrize.is_parametrized(m)]
    if named:
        warnings.warn(f"sparsify: the hooks and parametrizations of {', '.join(named)} are not carried to their sparse "
                      "layers (register them again on the returned model where they still apply)", stacklevel=3)


def _as_linear(conv1d: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` view of a Conv1D's numbers (weight [out, in] transposed back)."""
    w = conv1d.weight.detach().t()
    dense = nn.Linear(w.shape[1], w.shape[0], bias=conv1d.bias is not None, device=w.device, dtype=w.dtype)
    dense.weight = nn.Parameter(w)
    if conv1d.bias is not None:
        dense.bias = nn.Parameter(conv1d.bias.detach())
    return carry_flags(conv1d, dense)


def _sparsify_structured(model: nn.Module, layers: dict, sparsity: float, format: str, block_size: int) -> nn.Module:
    skipped = []
    for name, module in layers.items():
        conv1d = is_conv1d(module)
        if not conv1d and not isinstance(module, nn.Linear):
            skipped.append(f"{name} ({type(module).__name__})")
            continue
        linear = _as_linear(module) if conv1d else module
        out_f, in_f = linear.weight.shape
        if format == "2:4" and in_f % 4 == 0:
            new = Sparse24Linear.from_dense(linear)
        elif format == "bsr" and in_f % block_size == 0 and out_f % block_size == 0:
            new = BSRLinear.from_dense(linear, sparsity=sparsity, block_size=block_size)
        else:
            skipped.append(f"{name} ({out_f}x{in_f})")
            continue
        if conv1d:
            new.dense_origin = type(module)  # densify builds the Conv1D again
        model = _replace(model, name, new)
    if skipped:
        need = "in_features divisible by 4" if format == "2:4" else f"both dimensions divisible by {block_size}"
        warnings.warn(f"sparsify(format={format!r}): left dense, as the format needs nn.Linear with {need}: "
                      + ", ".join(skipped), stacklevel=3)
    return model


def densify(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Replaces every sparse layer (``SparseLinear``, ``SparseConv2d``, ``BSRLinear``,
    ``Sparse24Linear``) by the equivalent dense layer (zeros where pruned): ``nn.Linear``,
    ``nn.Conv2d``, or the transformers ``Conv1D`` class a layer was built from. Exact
    inverse of :func:`sparsify`'s swap."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"densify: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"densify: inplace must be a bool, got {inplace!r}")
    if not inplace:
        model = copy.deepcopy(model)
    # Every name a layer is registered under (a module shared by two parents), and one
    # dense twin per layer, so the tie holds in the dense model too.
    sparse = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, SPARSE_LAYERS)]
    twins: dict[int, nn.Module] = {}
    for name, module in sparse:
        if id(module) not in twins:
            twins[id(module)] = dense_twin(module)
        model = _replace(model, name, twins[id(module)])
    return model
