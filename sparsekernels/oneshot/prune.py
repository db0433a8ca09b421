"""``prune(model, loader, method=...)``: one-shot pruning of a trained model into real
sparse layers (no retraining)."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..formats import check_sparsity
from ..nn import Sparse24Linear, eligible_layers, sparse_class_for
from ..nn._conv1d import is_conv1d
from ..nn._module_swap import swap_module
from ..nn.sparsify import DEFAULT_INCLUDE
from ._progress import progress as progress_bar
from .calibration import collect_hessian, execution_order, materialise, weight_matrix
from .magnitude import magnitude_prune
from .mfac import FISHER_BLOCK_SIZE, FISHER_DAMP, NUM_GRADS, RECOMPUTATIONS, mfac_prune
from .obc import MAX_COLUMNS, obc_prune
from .patterns import check_block_size, check_nm_columns, parse_pattern, resolve_target
from .sparsegpt import BLOCK_SIZE, sparsegpt_prune

METHODS = ("magnitude", "obc", "sparsegpt", "mfac")


def _positive(name: str, value: object, *, integer: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if integer:
        check_int(name, value, "prune")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"prune: {name} must be a number > 0, got {type(value).__name__}")
    if not math.isfinite(float(value)) or value <= 0:
        raise ValueError(f"prune: {name} must be a finite number > 0, got {value!r}")


@torch.no_grad()
def _to_sparse(module: nn.Module, W: Tensor, kept: Tensor, nm: tuple[int, int] | None) -> nn.Module:
    """The sparse twin of ``module`` holding Ŵ ``W`` [out, k] at ``kept`` [out, k]:
    ``Sparse24Linear`` for 2:4 on an nn.Linear, else CSR ``SparseLinear`` / ``SparseConv2d``."""
    training = module.training
    # A shallow twin holding Ŵ: the dense layer itself stays as it was, so a failure later
    # in prune() can put it back unchanged.
    twin = copy.copy(module)
    twin._parameters = dict(module._parameters)
    new_weight = W.t() if is_conv1d(module) else W.reshape(module.weight.shape)
    twin.weight = nn.Parameter(new_weight.to(module.weight.dtype).contiguous(), requires_grad=module.weight.requires_grad)
    module = twin
    if nm == (2, 4) and isinstance(module, nn.Linear):
        sparse = Sparse24Linear.from_dense(module, mask=kept)
    else:
        mask = kept if is_conv1d(module) else kept.reshape(module.weight.shape)
        sparse = sparse_class_for(module).from_dense(module, mask=mask)
    sparse.train(training)
    return sparse


def prune(model: nn.Module, loader: Iterable | None, *, method: str = "sparsegpt",
          sparsity: float | Mapping[str, float] | None = None,
          pattern: str | tuple[int, int] | None = None, damp: float = 0.01, block_size: int = BLOCK_SIZE,
          max_columns: int = MAX_COLUMNS, loss_fn: Callable | None = None, num_grads: int = NUM_GRADS,
          fisher_block_size: int | None = FISHER_BLOCK_SIZE, fisher_damp: float = FISHER_DAMP,
          recomputations: int = RECOMPUTATIONS, include=DEFAULT_INCLUDE, exclude=(), inplace: bool = True,
          progress: bool = True) -> nn.Module:
    """Prunes a trained model in one shot and returns it with real sparse layers.

    Every ``nn.Linear`` / ``nn.Conv2d`` (and transformers ``Conv1D``) layer that
    :func:`sparsekernels.sparsify` would convert (``include`` / ``exclude`` as there) is
    pruned to ``sparsity`` and replaced by a CSR ``SparseLinear`` / ``SparseConv2d``, or by
    a ``Sparse24Linear`` for ``pattern="2:4"`` on an ``nn.Linear`` (other N:M patterns, and
    2:4 on convolutions, give CSR layers with that pattern).

    Methods (see each module for the paper and its algorithm):

    * ``"magnitude"``: smallest |w| (the baseline; needs no data, ``loader`` may be None);
    * ``"obc"``: exact greedy OBS per row (Optimal Brain Compression); layers with more than
      ``max_columns`` inputs are refused;
    * ``"sparsegpt"``: SparseGPT, blocks of ``block_size`` columns;
    * ``"mfac"``: OBS with the M-FAC inverse empirical Fisher; needs ``loss_fn(output,
      target)`` and a loader of ``(inputs, targets)``; ``num_grads``, ``fisher_block_size``
      (None: dense), ``fisher_damp``, ``recomputations`` as in :mod:`.mfac`.

    ``obc`` and ``sparsegpt`` calibrate on the loader's inputs: the layers are processed in
    the order the model calls them, each one's Hessian H = 2/N·XXᵀ collected from inputs
    that went through the layers already pruned (SparseGPT's sequential scheme), with
    dampening ``damp`` · mean(diag H). The model runs in eval mode while calibrating.

    Args:
        model: the trained model; changed in place unless ``inplace=False``.
        loader: iterable of batches: input tensors, ``(inputs, targets, ...)`` tuples or
            dicts of keyword inputs. Read once (kept as a list).
        sparsity: fraction of each layer's weights removed, in [0, 1) (default 0.5); with
            ``pattern`` it is 1 − N/M and may be left unset. Or a dict layer name ->
            sparsity (a per-layer profile, e.g. :func:`sparsekernels.spdy.search`'s plan;
            unstructured ``obc`` / ``sparsegpt`` / ``magnitude`` only): layers it maps to 0,
            or leaves out, stay as they are.
        pattern: None (unstructured) or ``"N:M"`` (N kept of every M inputs in a row; every
            pruned layer's in_features, per group for convolutions, must divide by M).
        progress: show a progress bar over the layers.
    Returns: the model with its eligible layers replaced by sparse ones.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune: model must be an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"prune: method must be one of {METHODS}, got {method!r}")
    nm = parse_pattern(pattern)
    per_layer = _per_layer(sparsity, nm, method)
    target = resolve_target(None if per_layer is not None else sparsity, nm)
    _positive("damp", damp)
    if method == "sparsegpt":  # the only pruner with column blocks
        check_block_size("prune", block_size, nm)
    else:
        _positive("block_size", block_size, integer=True)
    _positive("max_columns", max_columns, integer=True)
    if method == "mfac":
        if not callable(loss_fn):
            raise TypeError("prune(method='mfac'): loss_fn(output, target) is required (M-FAC's Fisher is built "
                            f"from loss gradients), got {loss_fn!r}")
        _positive("num_grads", num_grads, integer=True)
        _positive("fisher_block_size", fisher_block_size, integer=True, allow_none=True)
        _positive("fisher_damp", fisher_damp)
        _positive("recomputations", recomputations, integer=True)
    batches = None if (method == "magnitude" and loader is None) else materialise(loader)
    if method == "mfac" and not all(isinstance(b, (tuple, list)) and len(b) >= 2 for b in batches):
        raise TypeError("prune(method='mfac'): the loader must yield (inputs, targets) tuples (the Fisher is "
                        "built from loss gradients)")
    if not inplace:
        model = copy.deepcopy(model)
    layers = eligible_layers(model, include, exclude)
    if "" in layers:
        raise ValueError("prune: the model itself is a single layer; wrap it in a module (e.g. nn.Sequential) so "
                         "that it can be replaced by a sparse one")
    if per_layer is not None:
        unknown = sorted(set(per_layer) - set(layers))
        if unknown:
            raise ValueError(f"prune: sparsity names layers that are not prunable layers of the model: {unknown}; "
                             f"the prunable layers are {list(layers)}")
        layers = {n: m for n, m in layers.items() if per_layer.get(n, 0.0) > 0}
    for name, module in layers.items():
        check_nm_columns(weight_matrix(module).shape[1], nm, name)
        if method == "obc" and weight_matrix(module).shape[1] > max_columns:
            raise ValueError(f"prune(method='obc'): layer {name!r} has {weight_matrix(module).shape[1]} inputs > "
                             f"max_columns = {max_columns} (exact OBS costs O(rows·k³)); use method='sparsegpt'")
    if not layers:
        return model
    was = {mod: mod.training for mod in model.modules()}
    model.eval()
    swapped: list[tuple[str, nn.Module]] = []  # (name, the dense layer): put back if a later layer fails
    mfac_saved: dict[str, Tensor] | None = None
    try:
        if batches is not None:
            order = execution_order(model, layers, batches[0])
            missed = [n for n in layers if n not in order]
            if missed:
                warnings.warn(f"prune: layers never called by the model on the calibration data are left dense: "
                              f"{missed}", stacklevel=2)
        else:
            order = list(layers)
        layers = {n: layers[n] for n in order}
        results: dict[str, tuple[Tensor, Tensor]] = {}
        if method == "mfac":
            # M-FAC updates the dense weights in place between its recomputations: kept to
            # put back if it fails.
            mfac_saved = {name: module.weight.detach().clone() for name, module in layers.items()}
            results = mfac_prune(model, layers, batches, loss_fn, target, nm, num_grads=num_grads,
                                 block_size=fisher_block_size, damp=fisher_damp, recomputations=recomputations,
                                 progress=progress)
        for name, module in progress_bar(layers.items(), f"prune ({method})", progress, total=len(layers)):
            level = per_layer[name] if per_layer is not None else target
            if method == "mfac":
                W, kept = results[name]
            elif method == "magnitude":
                W, kept = magnitude_prune(weight_matrix(module), level, nm)
            else:
                H, _ = collect_hessian(model, module, batches)
                W, kept = prune_matrix(weight_matrix(module), H, method, level, nm, damp=damp,
                                       block_size=block_size, max_columns=max_columns)
            sparse = _to_sparse(module, W, kept, nm)
            was[sparse] = was[module]
            swap_module(model, name, sparse)
            swapped.append((name, module))
    except BaseException:
        # All layers or none: a failure halfway (a non-finite Hessian, an interrupt) must not
        # leave the model part sparse, part dense. The dense layers' weights: the sparse
        # layers are built from twins, and M-FAC's in-place updates are undone.
        for name, module in reversed(swapped):
            swap_module(model, name, module)
        with torch.no_grad():
            for name, weight in (mfac_saved or {}).items():
                layers[name].weight.copy_(weight)
        raise
    finally:
        for mod, flag in was.items():
            mod.train(flag)
    return model


def _per_layer(sparsity: object, nm: tuple[int, int] | None, method: str) -> dict[str, float] | None:
    """A per-layer sparsity dict, checked (None when ``sparsity`` is one number or unset)."""
    if not isinstance(sparsity, Mapping):
        return None
    if nm is not None or method == "mfac":
        raise ValueError("prune: a per-layer sparsity dict needs unstructured pruning with method 'magnitude', 'obc' "
                         f"or 'sparsegpt', got method={method!r}, pattern={nm!r}")
    for name in sparsity:
        if not isinstance(name, str):
            raise TypeError(f"prune: the keys of a sparsity dict must be layer names (str), got {name!r}")
    return {name: check_sparsity(s, f"prune: sparsity[{name!r}]") for name, s in sparsity.items()}


def prune_matrix(W: Tensor, H: Tensor, method: str, sparsity: float, nm: tuple[int, int] | None = None, *,
                 damp: float = 0.01, block_size: int = BLOCK_SIZE,
                 max_columns: int = MAX_COLUMNS) -> tuple[Tensor, Tensor]:
    """OBC / SparseGPT (``method`` "obc" / "sparsegpt") on one layer's weight matrix
    ``W`` [out, k] (:func:`weight_matrix`) with its Hessians ``H`` [groups, k, k]
    (:func:`collect_hessian`): group g prunes rows g·out/groups .. (g+1)·out/groups − 1 (a
    grouped convolution; groups = 1 otherwise). Returns (Ŵ [out, k], kept [out, k] bool)."""
    if method not in ("obc", "sparsegpt"):
        raise ValueError(f"prune_matrix: method must be 'obc' or 'sparsegpt', got {method!r}")
    if not isinstance(H, Tensor) or H.dim() != 3:
        raise ValueError("prune_matrix: H must be [groups, k, k] (collect_hessian's), got "
                         f"{tuple(H.shape) if isinstance(H, Tensor) else type(H).__name__}")
    groups = H.shape[0]
    if not isinstance(W, Tensor) or W.dim() != 2 or groups == 0 or W.shape[0] % groups:
        raise ValueError(f"prune_matrix: W must be [out, k] with out divisible by H's {groups} groups, got "
                         f"{tuple(W.shape) if isinstance(W, Tensor) else type(W).__name__}")
    per = W.shape[0] // groups
    outs, masks = [], []
    for g in range(groups):
        Wg = W[g * per:(g + 1) * per]
        if method == "obc":
            o, m = obc_prune(Wg, H[g], sparsity, nm, damp=damp, max_columns=max_columns)
        else:
            o, m = sparsegpt_prune(Wg, H[g], sparsity, nm, damp=damp, block_size=block_size)
        outs.append(o)
        masks.append(m)
    return torch.cat(outs), torch.cat(masks)
