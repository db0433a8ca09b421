"""Sparse checkpoints: load a sparse state dict into a dense-constructed model, and compact
safetensors files (values + int32 indices, no dense weights, no derived transpose maps).

A sparse layer's state-dict keys say its format:

* CSR (``SparseLinear``, ``SparseConv2d``): ``values``, ``row_ptr``, ``col_idx`` and the
  transpose map ``t_row_ptr``, ``t_col_idx``, ``t_perm``;
* BSR (``BSRLinear``): ``values [nb, b, b]``, ``crow``, ``ccol``, ``t_crow``, ``t_ccol``,
  ``t_perm``;
* 2:4 (``Sparse24Linear``): ``meta [out, in/4]`` with ``values [out, in/2]`` and the CSR view
  (``mode="fixed"``) or the dense master ``weight [out, in]`` (``mode="srste"``).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..formats.csr import build_transpose
from ..formats.sparse24 import check_meta_bytes
from ..nn import BSRLinear, Sparse24Linear, SparseConv2d, SparseLinear
from ..nn._conv1d import is_conv1d
from ..nn._module_swap import swap_module
from ..nn.sparsify import _as_linear
from ..reference import csr_rows, meta_columns

FORMAT_VERSION = 1
# A 2:4 layer's options that no tensor records (they go into a file's metadata, or come
# from a trainer callback's method).
SPARSE24_OPTIONS = ("transposable", "srste_lambda", "update_every")
_METADATA_KEY = "sparsekernels"

# Keys of each format that a compact file leaves out: the loader rebuilds them from the rest.
_DERIVED = {
    "csr": ("t_row_ptr", "t_col_idx", "t_perm"),
    "bsr": ("t_crow", "t_ccol", "t_perm"),
    "2:4": ("row_ptr", "col_idx", "t_row_ptr", "t_col_idx", "t_perm"),
}


# --------------------------------------------------------------------------- what the keys say
def _sparse_entries(state_dict: Mapping[str, object]) -> dict[str, str]:
    """Module name -> format ("csr", "bsr", "2:4 fixed", "2:4 srste") of every sparse layer
    the state dict holds, recognised by its complete set of index keys."""
    names = {k.rpartition(".")[0] for k in state_dict
             if k.rpartition(".")[2] in ("values", "meta", "crow", "row_ptr")}
    found = {}
    for name in sorted(names):
        p = name + "." if name else ""
        if p + "meta" in state_dict and p + "values" in state_dict:
            found[name] = "2:4 fixed"
        elif p + "meta" in state_dict and p + "weight" in state_dict:
            found[name] = "2:4 srste"
        elif all(p + k in state_dict for k in ("values", "crow", "ccol")):
            found[name] = "bsr"
        elif all(p + k in state_dict for k in ("values", "row_ptr", "col_idx")):
            found[name] = "csr"
    return found


def _tensor(state_dict: Mapping[str, object], key: str) -> Tensor:
    t = state_dict[key]
    if not isinstance(t, Tensor):
        raise TypeError(f"load_sparse_state_dict: state_dict[{key!r}] must be a tensor, got {type(t).__name__}")
    return t


def _expect(cond: bool, name: str, what: str) -> None:
    if not cond:
        raise ValueError(f"load_sparse_state_dict: sparse layer '{name}': {what}")


# --------------------------------------------------------------------------- the dense module
def _dense_linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a dense layer that converts to a ``SparseLinear``: ``nn.Linear``'s
    ``out_features`` / ``in_features``, or a transposed-weight Conv1D's ``nf`` and its
    weight [in, out]. None when neither is there."""
    out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
    if isinstance(out_f, int) and isinstance(in_f, int):
        return out_f, in_f
    w, nf = getattr(module, "weight", None), getattr(module, "nf", None)
    if isinstance(w, Tensor) and w.dim() == 2 and isinstance(nf, int) and w.shape[1] == nf:
        return nf, int(w.shape[0])
    return None


def _twin_class(module: nn.Module) -> type | None:
    """The sparse class ``sparsify`` would build for a dense ``module`` (None: not eligible).
    Its ``from_dense(module, mask=...)`` takes the mask in the sparse layer's orientation
    ([out, in] for every linear-like layer)."""
    # Looked up at call time: the nn package owns the map of convertible layer types.
    rules = importlib.import_module("..nn.sparsify", __package__)
    lookup = getattr(rules, "sparse_class_for", None)
    return lookup(module) if lookup is not None else rules._sparse_class(module, tuple(rules._SPARSE_OF))


# --------------------------------------------------------------------------- per format
def _csr_linear_mask(name: str, sd, p: str, out_f: int, in_f: int, device) -> Tensor:
    row_ptr, col_idx, values = (_tensor(sd, p + k) for k in ("row_ptr", "col_idx", "values"))
    _expect(row_ptr.dim() == 1 and row_ptr.numel() == out_f + 1, name,
            f"row_ptr has shape {tuple(row_ptr.shape)}, the model's layer has {out_f} output features "
            f"(expected [{out_f + 1}])")
    _expect(values.dim() == 1 and col_idx.dim() == 1 and values.numel() == col_idx.numel(), name,
            f"values {tuple(values.shape)} and col_idx {tuple(col_idx.shape)} must be 1-D of the same length")
    _expect(int(row_ptr[0]) == 0 and int(row_ptr[-1]) == values.numel() and bool((row_ptr[1:] >= row_ptr[:-1]).all()),
            name, "row_ptr must rise from 0 to nnz")
    _expect(col_idx.numel() == 0 or (int(col_idx.min()) >= 0 and int(col_idx.max()) < in_f), name,
            f"col_idx must lie in [0, {in_f}) (the model's layer has {in_f} input features)")
    mask = torch.zeros(out_f, in_f, dtype=torch.bool, device=device)
    mask[csr_rows(row_ptr).to(device), col_idx.long().to(device)] = True
    _expect(int(mask.sum()) == values.numel(), name, "col_idx repeats a column within a row")
    return mask


def _csr_conv_mask(name: str, sd, p: str, weight_shape: tuple[int, ...], groups: int, device) -> Tensor:
    """The [out, in/g, kh, kw] mask of a SparseConv2d state dict for a convolution of
    ``weight_shape`` and ``groups`` (its col_idx index the unfolded input, group offsets
    included)."""
    out_c, per_group_in, kh, kw = weight_shape
    per_group_cols = per_group_in * kh * kw
    m = _csr_linear_mask(name, sd, p, out_c, per_group_cols * groups, device)
    rows, cols = m.nonzero(as_tuple=True)
    local = cols - (rows // (out_c // groups)) * per_group_cols
    _expect(bool(((local >= 0) & (local < per_group_cols)).all()), name,
            f"col_idx leaves the block of its group (groups={groups}, {per_group_cols} columns per group)")
    mask = torch.zeros(out_c, per_group_cols, dtype=torch.bool, device=device)
    mask[rows, local] = True
    return mask.view(out_c, per_group_in, kh, kw)


def _bsr_block_mask(name: str, sd, p: str, out_f: int, in_f: int, device) -> tuple[Tensor, int]:
    values, crow, ccol = (_tensor(sd, p + k) for k in ("values", "crow", "ccol"))
    _expect(values.dim() == 3 and values.shape[1] == values.shape[2] and values.shape[1] > 0, name,
            f"BSR values must be [nb, b, b], got {tuple(values.shape)}")
    b = int(values.shape[1])
    _expect(out_f % b == 0 and in_f % b == 0, name,
            f"block size {b} does not divide the model's layer shape ({out_f}, {in_f})")
    nbr, nbc = out_f // b, in_f // b
    _expect(crow.dim() == 1 and crow.numel() == nbr + 1, name,
            f"crow has shape {tuple(crow.shape)}, expected [{nbr + 1}] for {out_f} output features")
    _expect(ccol.dim() == 1 and ccol.numel() == values.shape[0] and int(crow[0]) == 0
            and int(crow[-1]) == ccol.numel(), name, "crow / ccol do not match the number of blocks")
    _expect(ccol.numel() == 0 or (int(ccol.min()) >= 0 and int(ccol.max()) < nbc), name,
            f"ccol must lie in [0, {nbc})")
    block_mask = torch.zeros(nbr, nbc, dtype=torch.bool, device=device)
    block_mask[csr_rows(crow).to(device), ccol.long().to(device)] = True
    return block_mask, b


def _sparse24_mask(name: str, sd, p: str, mode: str, out_f: int, in_f: int, device) -> Tensor:
    meta = _tensor(sd, p + "meta")
    _expect(in_f % 4 == 0, name, f"2:4 needs in_features divisible by 4, the model's layer has {in_f}")
    _expect(tuple(meta.shape) == (out_f, in_f // 4), name,
            f"meta has shape {tuple(meta.shape)}, expected {(out_f, in_f // 4)} for the model's layer")
    held = _tensor(sd, p + ("values" if mode == "fixed" else "weight"))
    shape = (out_f, in_f // 2) if mode == "fixed" else (out_f, in_f)
    _expect(tuple(held.shape) == shape, name,
            f"{'values' if mode == 'fixed' else 'weight'} has shape {tuple(held.shape)}, expected {shape}")
    _expect(meta.dtype == torch.uint8, name, f"meta must be uint8, got {meta.dtype}")
    check_meta_bytes(f"load_sparse_state_dict: sparse layer '{name}'", meta)
    mask = torch.zeros(out_f, in_f, dtype=torch.bool, device=device)
    return mask.scatter(1, meta_columns(meta.to(device)), True)


# --------------------------------------------------------------------------- the swap
def _sparse_layer_of(name: str, module: nn.Module, kind: str, sd, config: dict) -> nn.Module | None:
    """Checks ``module`` against the state dict's sparse layer ``name`` of format ``kind``;
    returns its sparse twin when ``module`` is still dense, None when it is already sparse."""
    p = name + "." if name else ""
    typename = type(module).__name__
    if isinstance(module, (SparseLinear, SparseConv2d, BSRLinear, Sparse24Linear)):
        expected = {"csr": (SparseLinear, SparseConv2d), "bsr": (BSRLinear,)}.get(kind, (Sparse24Linear,))
        _expect(isinstance(module, expected), name,
                f"the state dict holds a {kind} layer, the model's module is a {typename}")
        if isinstance(module, SparseConv2d):
            _csr_conv_mask(name, sd, p, tuple(module.weight_shape), module.groups, module.values.device)
        elif isinstance(module, SparseLinear):
            _csr_linear_mask(name, sd, p, module.out_features, module.in_features, module.values.device)
        elif isinstance(module, BSRLinear):
            _, b = _bsr_block_mask(name, sd, p, module.out_features, module.in_features, module.values.device)
            _expect(b == module.block_size, name,
                    f"the state dict has {b}x{b} blocks, the model's BSRLinear {module.block_size}x{module.block_size}")
        else:
            mode = kind.split()[1]
            _expect(module.mode == mode, name, f"the state dict holds a 2:4 {mode} layer, the model's "
                                               f"Sparse24Linear has mode={module.mode!r}")
            _sparse24_mask(name, sd, p, mode, module.out_features, module.in_features, module.meta.device)
            # Options no tensor records: transposable shaped the masks, so it must agree;
            # the others are the saved run's and replace the layer's (after the checks).
            if "transposable" in config:
                _expect(bool(config["transposable"]) == module.transposable, name,
                        f"saved with transposable={bool(config['transposable'])}, the model's Sparse24Linear has "
                        f"transposable={module.transposable}")
        return None

    _check_recorded_layer(name, module, config)
    twin = _twin_class(module)
    if twin is SparseConv2d:
        _expect(kind == "csr", name, f"the state dict holds a {kind} layer, the model's module is a {typename} "
                                     "(only CSR convolutions exist)")
        new = SparseConv2d.from_dense(module, mask=_csr_conv_mask(name, sd, p, tuple(module.weight.shape),
                                                                          module.groups, module.weight.device))
        keep = ("bias",)
    else:
        dims = _dense_linear_dims(module) if twin is not None else None
        _expect(dims is not None, name,
                f"the state dict holds a sparse ({kind}) layer but the model's module there is a {typename}, "
                "not a layer sparsify can convert (nn.Linear, nn.Conv2d, ...)")
        out_f, in_f = dims
        device = module.weight.device
        if kind == "csr":
            new = twin.from_dense(module, mask=_csr_linear_mask(name, sd, p, out_f, in_f, device))
            keep = ("bias",)
        else:
            conv1d = is_conv1d(module)
            _expect(isinstance(module, nn.Linear) or (conv1d and kind != "2:4 srste"), name,
                    f"{kind} layers are built from nn.Linear{' or a Conv1D' if kind != '2:4 srste' else ''}, the "
                    f"model's module is a {typename}")
            origin = module
            if conv1d:  # sparsify built the layer from the Conv1D's nn.Linear view, and so does this
                module = _as_linear(module)
            if kind == "bsr":
                block_mask, b = _bsr_block_mask(name, sd, p, out_f, in_f, device)
                new = BSRLinear.from_dense(module, block_mask=block_mask, block_size=b)
                keep = ("bias",)
            else:
                mode = kind.split()[1]
                options = {k: config[k] for k in ("srste_lambda", "update_every", "transposable") if k in config}
                new = Sparse24Linear.from_dense(module, mask=_sparse24_mask(name, sd, p, mode, out_f, in_f, device),
                                                mode=mode, **options)
                # SR-STE trains the dense master weight: keep the module's own Parameter too.
                keep = ("bias", "weight") if mode == "srste" else ("bias",)
            if conv1d:
                new.dense_origin = type(origin)  # densify gives the Conv1D back
                module = origin
    for attr in keep:
        # The same Parameter objects: an optimizer (and its state) built on them stays valid.
        if getattr(module, attr, None) is not None:
            setattr(new, attr, getattr(module, attr))
    return new


def _check_recorded_layer(name: str, module: nn.Module, config: dict) -> None:
    """Where a file recorded the saved layer's class and weight shape (:func:`save`), the
    module it goes into must be of that kind: a CSR pattern [32, 16] fits an nn.Linear(16,
    32) and a 1x1 nn.Conv2d(16, 32) alike, and a [32, 16] conv pattern a 2x2 kernel over 4
    channels as well as a linear layer, where the numbers mean other things."""
    saved = config.get("layer")
    if saved is None:
        return
    conv = isinstance(module, (nn.Conv2d, SparseConv2d))
    if (saved == "SparseConv2d") != conv:
        raise ValueError(f"load: layer '{name}' was saved as a {saved}, the model's module is a "
                         f"{type(module).__name__}")
    if conv and "weight_shape" in config:
        shape = list(module.weight_shape) if isinstance(module, SparseConv2d) else list(module.weight.shape)
        _expect(shape == list(config["weight_shape"]), name,
                f"saved with weight shape {list(config['weight_shape'])}, the model's convolution has {shape}")


def _swap_and_load(model: nn.Module, state_dict: Mapping[str, object], strict: bool,
                   configs: Mapping[str, dict], only: set | None = None) -> nn.Module:
    """``only``: the names the file says are sparse layers (None: recognised by their keys)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_sparse_state_dict: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"load_sparse_state_dict: state_dict must be a mapping of names to tensors, got "
                        f"{type(state_dict).__name__}")
    # A model built on the meta device has no values to swap or load into (its layers'
    # patterns would be read from tensors without data).
    on_meta = next((n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
    if on_meta is not None:
        raise ValueError(f"load_sparse_state_dict: the model is on the meta device ('{on_meta}'); materialise it "
                         "first, e.g. model.to_empty(device='cpu'), then load")
    # Every name a module is registered under (one shared by two parents is saved under both).
    modules = dict(model.named_modules(remove_duplicate=False))
    swaps, twins = {}, {}
    entries = {n: k for n, k in _sparse_entries(state_dict).items() if only is None or n in only}
    # Check every layer before swapping any, so a bad state dict leaves the model untouched.
    for name, kind in entries.items():
        if name not in modules:
            prefixes = sorted({k.split(".")[0] for k in state_dict})[:5]
            raise ValueError(f"load_sparse_state_dict: the state dict holds a sparse layer '{name}' ({kind}) but "
                             f"the model has no module of that name; if the keys carry a prefix (the state dict's "
                             f"first names: {prefixes}), strip it first")
        module = modules[name]
        new = twins[id(module)] if id(module) in twins else \
            _sparse_layer_of(name, module, kind, state_dict, dict(configs.get(name, {})))
        if new is not None:
            _expect(name != "", name, "the model itself is the dense layer; wrap it in a module")
            swaps[name] = twins[id(module)] = new  # one sparse twin for a shared module
    originals = {name: modules[name] for name in swaps}
    # The dense modules' Parameters the sparse layers took over (bias; SR-STE's weight):
    # a failed load may have written into them before it raised.
    shared = [(p, p.detach().clone()) for name, new in swaps.items()
              for p in originals[name].parameters(recurse=False)
              if any(p is q for q in new.parameters(recurse=False))]
    for name, new in swaps.items():
        swap_module(model, name, new)
    try:
        model.load_state_dict(state_dict, strict=strict)
    except BaseException:
        # The swapped layers go back to the dense modules they replaced, as they were (the
        # rest is as torch's own failed load leaves it).
        for name, module in originals.items():
            swap_module(model, name, module)
        with torch.no_grad():
            for p, saved in shared:
                p.copy_(saved)
        raise
    for name in entries:
        m, config = model.get_submodule(name), configs.get(name, {})
        if isinstance(m, Sparse24Linear):
            if "srste_lambda" in config:
                m.srste_lambda = float(config["srste_lambda"])
            if "update_every" in config:
                m.update_every = int(config["update_every"])
    return model


def load_sparse_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool = True,
                           sparse24_options: Mapping[str, object] | None = None) -> nn.Module:
    """Loads a state dict holding sparse layers into ``model``, in place, and returns it.

    Every module the state dict says is sparse (by its keys; see the module docstring)
    that is still dense in ``model`` (``nn.Linear``, ``nn.Conv2d`` or another layer
    :func:`sparsekernels.sparsify` converts) is first swapped for the sparse layer of that
    format and pattern, built by the layer's own ``from_dense``; the dense module's bias
    Parameter (and, for 2:4 SR-STE, its weight) is kept. Modules already sparse are loaded
    as they are (a different nnz is taken over). Then ``model.load_state_dict(state_dict,
    strict=strict)`` runs. Build the optimizer after this call: a swapped layer's trainable
    ``values`` is a new Parameter.

    Keys are matched to ``model.named_modules()`` names as they are: strip a prefix first,
    e.g. ``{k.removeprefix("model."): v for k, v in sd.items()}`` for a Lightning
    checkpoint of a module held as ``self.model``.

    A 2:4 layer's options that no tensor records (``transposable``, ``srste_lambda``,
    ``update_every``) come from ``sparse24_options`` (the same for every 2:4 layer; a
    trainer callback passes its method's), else take their defaults; :func:`load` restores
    them per layer from the file. An already-sparse 2:4 layer must have the given
    ``transposable`` and takes the other two.

    The swap and the load happen together: if the load fails (a missing or unexpected key
    under ``strict``, a tensor that does not fit), the dense modules are put back.

    Raises:
        ValueError: the state dict names a sparse layer the model lacks, or one whose shape
            or kind does not fit the model's module there; nothing is swapped then.
        TypeError: ``model`` is not a module or ``state_dict`` not a mapping.
    """
    options = {}
    if sparse24_options is not None:
        if not isinstance(sparse24_options, Mapping) or not set(sparse24_options) <= set(SPARSE24_OPTIONS):
            raise ValueError(f"load_sparse_state_dict: sparse24_options must map some of {SPARSE24_OPTIONS} to "
                             f"values, got {sparse24_options!r}")
        options = dict(sparse24_options)
    configs = {name: options for name, kind in _sparse_entries(state_dict).items() if kind.startswith("2:4")} \
        if options and isinstance(state_dict, Mapping) else {}
    return _swap_and_load(model, state_dict, strict, configs)


# --------------------------------------------------------------------------- compact files
def _layer_configs(model: nn.Module) -> dict[str, dict]:
    """The shape and options of every sparse layer that its stored tensors do not record."""
    out = {}
    for name, m in model.named_modules(remove_duplicate=False):  # a shared layer under each of its names
        if isinstance(m, Sparse24Linear):
            out[name] = {"mode": m.mode, "transposable": m.transposable, "srste_lambda": m.srste_lambda,
                         "update_every": m.update_every}
        elif isinstance(m, BSRLinear):
            out[name] = {"shape": [m.out_features, m.in_features]}
        elif isinstance(m, SparseConv2d):
            out[name] = {"shape": list(m._matrix_shape), "layer": "SparseConv2d", "weight_shape": list(m.weight_shape)}
        elif isinstance(m, SparseLinear):
            out[name] = {"shape": list(m._matrix_shape), "layer": "SparseLinear"}
    return out


def _matrix_shape(sd: Mapping[str, Tensor], p: str, name: str, fmt: str) -> list[int]:
    """[rows, cols] of a CSR / BSR layer's matrix from a state dict alone: the column count
    is the length of the transpose map's row pointers (times the block size for BSR)."""
    ptr, t_ptr = ("row_ptr", "t_row_ptr") if fmt == "csr" else ("crow", "t_crow")
    if p + t_ptr not in sd:
        raise ValueError(f"sparsekernels.save: {fmt.upper()} layer '{name}' has no {t_ptr}, so its column count "
                         "is unknown; save the model itself or its complete state_dict()")
    b = int(sd[p + "values"].shape[-1]) if fmt == "bsr" else 1
    return [(sd[p + ptr].numel() - 1) * b, (sd[p + t_ptr].numel() - 1) * b]


def _fspath(owner: str, path: object) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{owner}: path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def save(model_or_state_dict: nn.Module | Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Writes a compact safetensors file: sparse layers as values + int32 indices (the
    transpose maps, and the CSR view of a 2:4 layer, are left out: :func:`load` rebuilds
    them), every other tensor dense.

    The sparse formats, matrix shapes and the layer options no tensor records (2:4 mode,
    ``transposable``, ...) go into the file's metadata. Tensors that are the same view (tied
    weights) are stored once. With fp32 weights a CSR layer takes 8 bytes per non-zero: at
    90% sparsity about a fifth of the dense layer.
    """
    from safetensors.torch import save_file

    if isinstance(model_or_state_dict, nn.Module):
        sd, configs = model_or_state_dict.state_dict(), _layer_configs(model_or_state_dict)
    elif isinstance(model_or_state_dict, Mapping):
        sd, configs = dict(model_or_state_dict), {}
    else:
        raise TypeError(f"sparsekernels.save: expected an nn.Module or a state dict, got "
                        f"{type(model_or_state_dict).__name__}")
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"sparsekernels.save: state_dict[{k!r}] is a {type(v).__name__}; only tensors can be "
                            "stored")
    layers, derived = {}, set()
    entries = _sparse_entries(sd)
    if isinstance(model_or_state_dict, nn.Module):
        # Only the model's sparse layers: a plain module that happens to hold a `weight`
        # and a `meta` buffer is not an SR-STE layer.
        entries = {n: k for n, k in entries.items() if n in configs}
    for name, kind in entries.items():
        p = name + "." if name else ""
        fmt, _, mode = kind.partition(" ")
        record = {"format": fmt, **configs.get(name, {})}
        if fmt == "2:4":
            record["mode"] = mode
        elif "shape" not in record:
            record["shape"] = _matrix_shape(sd, p, name, fmt)
        layers[name] = record
        derived.update(p + k for k in _DERIVED[fmt])
    tensors, aliases, seen, storages = {}, {}, {}, set()
    for k, v in sd.items():
        if k in derived:
            continue
        v = v.detach()
        view = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype,
                str(v.device))
        if view in seen:  # a tied weight: stored once, restored as the same tensor
            aliases[k] = seen[view]
            continue
        seen[view] = k
        # safetensors refuses tensors that share memory: a second, different view is copied.
        storage = (v.untyped_storage().data_ptr(), str(v.device))
        shared = storage in storages and v.numel() > 0
        storages.add(storage)
        tensors[k] = (v.clone() if shared else v).to("cpu").contiguous()
    meta = {"version": FORMAT_VERSION, "layers": layers, "aliases": aliases}
    path = _fspath("sparsekernels.save", path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        raise ValueError(f"sparsekernels.save: cannot write {path!r}: "
                         + ("it is a directory" if os.path.isdir(path) else f"no folder {folder!r}"))
    save_file(tensors, path, metadata={_METADATA_KEY: json.dumps(meta)})


def _rebuild(sd: dict[str, Tensor], name: str, record: dict) -> None:
    """Adds the derived index tensors of sparse layer ``name`` back to ``sd`` (in place)."""
    p = name + "." if name else ""
    fmt = record.get("format")
    if fmt in ("csr", "bsr"):
        ptr, idx = ("row_ptr", "col_idx") if fmt == "csr" else ("crow", "ccol")
        for k in (ptr, idx, "values"):
            if p + k not in sd:
                raise ValueError(f"sparsekernels.load: {fmt.upper()} layer '{name}' lacks '{p + k}' in the file")
        cols = int(record["shape"][1]) // (int(sd[p + "values"].shape[-1]) if fmt == "bsr" else 1)
        sd.update({p + k: t for k, t in zip(_DERIVED[fmt], build_transpose(sd[p + ptr], sd[p + idx], cols))})
    elif fmt == "2:4":
        if record.get("mode") != "fixed":
            return  # SR-STE keeps no CSR view
        meta = sd[p + "meta"]
        out_f, in_f = meta.shape[0], meta.shape[1] * 4
        # The fixed layer's CSR view: every row holds in/2 entries, columns from meta (sorted
        # within each row, as Sparse24Linear builds it).
        row_ptr = torch.arange(0, out_f + 1, dtype=torch.int64).mul_(in_f // 2).to(torch.int32)
        col_idx = meta_columns(meta).reshape(-1).to(torch.int32)
        sd.update({p + "row_ptr": row_ptr, p + "col_idx": col_idx})
        sd.update({p + k: t for k, t in zip(_DERIVED["csr"], build_transpose(row_ptr, col_idx, in_f))})
    else:
        raise ValueError(f"sparsekernels.load: layer '{name}' has an unknown format {fmt!r} in the file's metadata")


def read(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """The full state dict of a file :func:`save` wrote (derived index tensors rebuilt, tied
    keys restored) and its per-layer records (format, shape, options), on the CPU."""
    from safetensors import safe_open

    path = _fspath("sparsekernels.load", path)
    if not os.path.isfile(path):
        raise ValueError(f"sparsekernels.load: path {path!r} is not a file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(_METADATA_KEY)
            if raw is None:
                raise ValueError(f"sparsekernels.load: {path!r} is a safetensors file without sparsekernels "
                                 "metadata; write it with sparsekernels.save")
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except ValueError:
        raise
    except Exception as exc:  # safetensors' own errors: not a safetensors file, truncated, ...
        raise ValueError(f"sparsekernels.load: {path!r} is not a readable safetensors file written by "
                         f"sparsekernels.save ({type(exc).__name__}: {exc})") from None
    bad = f"sparsekernels.load: {path!r} has corrupt sparsekernels metadata"
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"{bad} (not JSON)") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{bad} (not a JSON object)")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"sparsekernels.load: {path!r} has format version {meta.get('version')!r}, this "
                         f"sparsekernels reads version {FORMAT_VERSION}")
    aliases, layers = meta.get("aliases", {}), meta.get("layers", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and v in sd for k, v in aliases.items()):
        raise ValueError(f"{bad} (aliases must map keys to stored tensors)")
    if not isinstance(layers, dict) or not all(isinstance(r, dict) for r in layers.values()):
        raise ValueError(f"{bad} (layers must map layer names to records)")
    for key, source in aliases.items():
        sd[key] = sd[source]
    for name, record in layers.items():
        try:
            _rebuild(sd, name, record)
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"{bad} (layer {name!r}: {type(exc).__name__} {exc})") from None
    return sd, layers


def load(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Loads a file written by :func:`save` into ``model`` (dense-constructed or already
    sparse), in place, through :func:`load_sparse_state_dict`; returns the model. The
    derived index tensors are rebuilt, and 2:4 layers get the options recorded in the file.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsekernels.load: model must be an nn.Module, got {type(model).__name__}")
    sd, layers = read(path)
    return _swap_and_load(model, sd, strict, layers, only=set(layers))
