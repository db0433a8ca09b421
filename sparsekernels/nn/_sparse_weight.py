"""What SparseLinear and SparseConv2d share: a CSR weight held as one trainable 1-D
``values`` parameter (so optimizer state is O(nnz)) and int32 index buffers."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import reference
from .._checks import check_int
from ..formats import CSR, check_sparsity, magnitude_mask
from ..formats.masks import check_mask
from ..formats.csr import check_csr_structure
from ..kernels.pattern_cache import PatternCache
from ..ops import spmm
from ..ops._functorch import transforms_active
from ..ops.autocast import same_cast_dtype

_PATTERN = ("row_ptr", "col_idx", "t_row_ptr", "t_col_idx", "t_perm")
# "This pattern is every position, row-major" per (row_ptr, col_idx) tensor pair.
_FULL_PATTERN = PatternCache()


def resize_parameter(param: nn.Parameter, data: Tensor) -> None:
    """Gives ``param`` new data of any shape, keeping the Parameter object (optimizers and
    DDP hold it) and dropping its ``.grad``.

    Why not just ``param.data = data``: autograd caches the parameter's gradient
    accumulator while any earlier graph is alive (the usual ``loss`` variable of a loop),
    and that accumulator still expects the old shape, so the next backward would fail. Torch
    drops the cached accumulator when ``.data`` changes dtype, so for a new shape we pass
    through a one-element tensor of another dtype first. For the same shape the accumulator
    is kept: DDP registers its gradient hooks on it (RigL / SET keep nnz, so DDP works)."""
    if tuple(data.shape) != tuple(param.shape):
        other = torch.float32 if data.dtype != torch.float32 else torch.float64
        param.data = torch.empty(1, dtype=other, device=data.device)
    param.data = data
    param.grad = None


def check_layer_input(owner: str, x: object, weight: Tensor, in_features: int | None = None) -> Tensor:
    """A layer input's type, dtype and device against the layer's weight, and (for linear
    layers) its last dimension: TypeError / ValueError naming the layer."""
    if not isinstance(x, Tensor):
        if isinstance(x, torch.fx.Proxy):
            raise TypeError(f"{owner}: torch.fx.symbolic_trace traced into the sparse layer; trace the model with "
                            "sparsekernels.nn.symbolic_trace (or a tracer subclassing sparsekernels.nn.SparseTracer), "
                            "which keeps the sparse layers as leaf modules")
        raise TypeError(f"{owner}: input must be a torch.Tensor, got {type(x).__name__}")
    # Under autocast the ops cast input and weights to the autocast dtype (ops/autocast.py),
    # so e.g. a bf16 input meets fp32 master weights there, as with nn.Linear.
    if not same_cast_dtype(x, weight):
        raise TypeError(f"{owner}: input has dtype {x.dtype} but the layer's weights are {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{owner}: input is on {x.device} but the layer's weights are on {weight.device}")
    if in_features is not None and (x.dim() < 1 or x.shape[-1] != in_features):
        raise ValueError(f"{owner}: input must have shape [..., {in_features}], got {tuple(x.shape)}")
    return x


def _weights_of(module: nn.Module) -> nn.Parameter | None:
    """The trainable weights of a dense or sparse layer: ``values`` or ``weight``."""
    for name in ("values", "weight"):
        p = module._parameters.get(name)
        if p is not None:
            return p
    return None


def carry_flags(src: nn.Module, dst: nn.Module) -> nn.Module:
    """What a conversion (from_dense, to_dense, densify) keeps besides the numbers: the
    training mode, and whether the weights and the bias train, so a frozen layer stays
    frozen (the new Parameters had all required grad). Returns ``dst``."""
    dst.train(src.training)
    ws, wd = _weights_of(src), _weights_of(dst)
    if ws is not None and wd is not None:
        wd.requires_grad_(ws.requires_grad)
    bs, bd = src._parameters.get("bias"), dst._parameters.get("bias")
    if bs is not None and bd is not None:
        bd.requires_grad_(bs.requires_grad)
    return dst


def dense_linear(weight: Tensor, bias: Tensor | None, training: bool) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` [out, in] and ``bias`` (the ``to_dense``
    of every sparse linear layer)."""
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    dense.train(training)
    return dense


def kept_mask(owner: str, weight: Tensor, sparsity: float | None, mask: Tensor | None) -> Tensor:
    """The positions ``from_dense`` keeps: ``mask`` if given (checked against the weight's
    shape), else the largest-magnitude weights at ``sparsity``, else the non-zeros."""
    if mask is not None and sparsity is not None:
        raise ValueError(f"{owner}: give mask or sparsity, not both")
    if mask is None:
        return magnitude_mask(weight, check_sparsity(sparsity)) if sparsity is not None else weight != 0
    return check_mask(owner, mask, tuple(weight.shape))


def check_not_meta(owner: str, device=None) -> None:
    """A sparse layer chooses or reads its pattern from data when it is built: on the meta
    device (``device="meta"``, or None under ``with torch.device("meta")``) there is none,
    and torch's own error (nonzero / item on a meta tensor) did not say so. ValueError."""
    if torch.empty(0, device=device).is_meta:
        raise ValueError(f"{owner}: cannot be built on the meta device: the sparsity pattern is chosen from the "
                         f"weights' data (build on 'cpu' or a GPU, or sparsify a model whose weights exist)")


def check_features(owner: str, in_features: object, out_features: object) -> None:
    """in_features / out_features of a linear layer: non-negative ints (as nn.Linear takes)."""
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        check_int(name, v, owner, minimum=0)


def check_loaded_pattern(layer: nn.Module, state_dict, prefix: str, names: tuple[str, ...],
                         shape: tuple[int, int]) -> None:
    """Before a layer loads a checkpoint: where it holds the layer's pattern (the five
    index tensors ``names``), raises ValueError unless they are a pattern of ``shape`` with
    its own transpose map and as many entries as the checkpoint's values
    (:func:`check_csr_structure`), and, for a grouped convolution, every entry inside its
    group's block. The kernels check column ranges, not that the transpose map belongs to
    the pattern: a corrupt one would give wrong input gradients, silently."""
    keys = [prefix + n for n in names]
    if not all(k in state_dict for k in keys):
        return  # strict loading reports the missing keys
    owner = f"{type(layer).__name__}.load_state_dict ({prefix.rstrip('.') or 'root'})"
    pattern = tuple(state_dict[k] for k in keys)
    nnz = pattern[1].shape[0] if isinstance(pattern[1], Tensor) and pattern[1].dim() == 1 else -1
    values = state_dict.get(prefix + "values")
    if isinstance(values, Tensor) and values.shape[0] != nnz:
        raise ValueError(f"{owner}: values has {values.shape[0]} entries but {names[1]} has {nnz}")
    row_ptr, col_idx, *_ = check_csr_structure(owner, nnz, pattern, shape, names)
    groups, rows_per_group, cols_per_group = getattr(layer, "groups_layout", (1, 0, 0))
    if groups > 1 and nnz:
        rows = reference.csr_rows(row_ptr)
        if bool((rows // rows_per_group != col_idx.long() // cols_per_group).any()):
            raise ValueError(f"{owner}: {names[1]} has entries outside their group's block ({groups} groups)")


def take_checkpoint_sizes(layer: nn.Module, state_dict, prefix: str, names: tuple[str, ...]) -> None:
    """Before a layer loads a checkpoint: where it holds another number of entries (another
    sparsity, a later topology) in ``values`` and the whole pattern (the index buffers
    ``names``), resizes the layer's to the checkpoint's, so the load takes them wholesale.
    Values of another size without their pattern are left to torch's size-mismatch error,
    which ``strict=False`` raises too (resized alone they had loaded, and left values and
    pattern of different lengths); a pattern of another size without values, and part of
    a pattern, are a ValueError: the parts would no longer describe one matrix."""
    keys = [prefix + n for n in names]
    present = [k in state_dict for k in keys]
    owner = f"{type(layer).__name__}.load_state_dict ({prefix.rstrip('.') or 'root'})"
    if any(present) and not all(present):
        have = ", ".join(n for n, p in zip(names, present) if p)
        missing = ", ".join(n for n, p in zip(names, present) if not p)
        raise ValueError(f"{owner}: the checkpoint holds {have} but not {missing}: a pattern loads whole or not at "
                         f"all")
    values = state_dict.get(prefix + "values")
    entries = state_dict[keys[1]].shape[0] if all(present) and isinstance(state_dict[keys[1]], Tensor) else None
    if values is None and entries is not None and entries != layer.values.shape[0]:
        # Its row pointers have the layer's size and would load: over the layer's values.
        raise ValueError(f"{owner}: the checkpoint holds a pattern of {entries} entries and no values; the layer holds "
                         f"{layer.values.shape[0]}")
    if all(present) and isinstance(values, Tensor) and values.shape != layer.values.shape:
        resize_parameter(layer.values, torch.empty_like(values, dtype=layer.values.dtype, device=layer.values.device))
        for name, key in zip(names, keys):
            setattr(layer, name, torch.empty_like(state_dict[key], dtype=getattr(layer, name).dtype,
                                                  device=layer.values.device))


class CompressedWeightModule(nn.Module):
    """Base of the layers that store only their kept weights: ``layer.weight`` (which code
    written for ``nn.Linear`` / ``nn.Conv2d`` reaches for) says where the weight is, as an
    AttributeError, so ``hasattr(layer, "weight")`` stays False. A dense ``weight`` view
    would take writes (``layer.weight.data.normal_()``) without effect."""

    def __getattr__(self, name: str):
        # Every parameter / buffer lookup comes here (nn.Module keeps them out of __dict__):
        # the common case goes straight on, no super() or try (0.5 us per access otherwise).
        if name != "weight" or "weight" in self._parameters:
            return nn.Module.__getattr__(self, name)
        raise AttributeError(
            f"{type(self).__name__} has no dense `weight`: it stores only the kept weights, in `values` (the "
            f"trainable parameter); `dense_weight()` gives the weight with zeros where pruned (a copy, no grad) "
            f"and `to_dense()` the equivalent dense layer") from None


class SparseWeightMixin(CompressedWeightModule):
    """Holds ``values`` [nnz] (Parameter) and the CSR pattern of a ``[rows, cols]`` matrix
    (buffers ``row_ptr``, ``col_idx``, ``t_row_ptr``, ``t_col_idx``, ``t_perm``)."""

    values: nn.Parameter
    row_ptr: Tensor
    col_idx: Tensor
    t_row_ptr: Tensor
    t_col_idx: Tensor
    t_perm: Tensor

    def _init_sparse_weight(self, csr: CSR, dense_numel: int | None = None) -> None:
        """``dense_numel``: entries of the logical dense weight (default rows * cols; a
        grouped convolution stores a block-diagonal matrix larger than its weight)."""
        self.values = nn.Parameter(csr.values.detach().clone())
        for name, t in zip(_PATTERN, csr.pattern()):
            self.register_buffer(name, t)
        self._matrix_shape = tuple(csr.shape)
        self._dense_numel = csr.shape[0] * csr.shape[1] if dense_numel is None else dense_numel

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(f), 1/sqrt(f)) for weights and bias, as ``nn.Linear`` /
        ``nn.Conv2d`` do, with f the mean kept fan-in (nnz / output features) instead of
        the dense fan-in, so the output variance does not shrink with the sparsity."""
        rows = self._matrix_shape[0]
        fan_in = self.nnz / rows if rows else 0
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        with torch.no_grad():
            self.values.uniform_(-bound, bound)
            if getattr(self, "bias", None) is not None:
                self.bias.uniform_(-bound, bound)

    def set_csr(self, csr: CSR) -> None:
        """Replaces the pattern and values in place (same Parameter object, resized), e.g.
        after a topology update. Optimizer state must be remapped by the caller."""
        if tuple(csr.shape) != self._matrix_shape:
            raise ValueError(f"set_csr: expected a {self._matrix_shape} matrix, got {tuple(csr.shape)}")
        resize_parameter(self.values, csr.values.detach().to(self.values.dtype).clone())
        for name, t in zip(_PATTERN, csr.pattern()):
            setattr(self, name, t.to(self.values.device))

    def csr(self) -> CSR:
        """The weight as a :class:`CSR` (sharing this module's tensors)."""
        return CSR(self.values, self.row_ptr, self.col_idx, self.t_row_ptr, self.t_col_idx, self.t_perm,
                   self._matrix_shape)

    def _full_row_major(self) -> bool:
        """Whether every position of the stored matrix is active in row-major order, so that
        ``values.view(rows, cols)`` IS the dense weight (a layer grown to density 1: AC/DC's
        and GaP's dense phases). Checked on the pattern tensors once (cached while they are
        unchanged); never under torch.compile, which keeps the sparse op."""
        rows, cols = self._matrix_shape
        if self.values.numel() != rows * cols or not rows * cols or torch.compiler.is_compiling():
            return False

        def full() -> bool:
            rp, ci = self.row_ptr, self.col_idx
            step = torch.arange(0, rows * cols + 1, cols, device=rp.device, dtype=rp.dtype)
            return bool(torch.equal(rp, step)) and bool(
                torch.equal(ci.view(rows, cols), torch.arange(cols, device=ci.device, dtype=ci.dtype).expand(rows, cols)))

        return _FULL_PATTERN.get((self.row_ptr, self.col_idx), (rows, cols), full)

    def _matmul(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x [..., cols] -> x @ W^T (+ bias [rows]) [..., rows] through the sparse kernels
        (the CPU kernel adds the bias as it writes the output); a layer at density 1 runs a
        plain dense matmul on a view of ``values`` (no copy, gradients flow into ``values``
        unchanged): the CSR kernels measured ~4x slower than it there (CPU, 2048x2048,
        batch 256), and the reference backend densifies on every call."""
        if self._full_row_major():
            y = torch.nn.functional.linear(x, self.values.reshape(self._matrix_shape), bias)
        else:
            y = spmm(x, self.values, self.row_ptr, self.col_idx, self.t_row_ptr, self.t_col_idx, self.t_perm, bias)
        # (Not inside functorch transforms: the captured tensors would be their wrapped ones.)
        if self._capture and y.requires_grad and not transforms_active():
            # Topology updates score inactive weights by |dy^T x| of this step: keep the
            # matmul's input and, through a hook, its output gradient. Every forward of the
            # step gets its own slot (gradient accumulation, a layer used twice), and the
            # slots are concatenated along the batch. The hook sits on the product's
            # backward node, not on y: it then sees dy after every hook a caller registers
            # on y (those run first), i.e. the gradient that reaches the weights.
            slot = [x.detach().reshape(x.shape[:-1].numel(), x.shape[-1]), None]
            self._captured.append(slot)

            def keep(grad_outputs, slot=slot, nr=y.output_nr):
                # y's own gradient: a node may have several outputs (a compiled graph's).
                g = grad_outputs[nr]
                if g is not None:
                    slot[1] = g.detach().reshape(g.shape[:-1].numel(), g.shape[-1])

            y.grad_fn.register_prehook(keep)
        return y

    # ------------------------------------------------------------------ capture for regrowth
    _capture = False

    def capture_next(self, enabled: bool = True) -> None:
        """Keep (or stop keeping, and free) the matmul inputs and output gradients of the
        following forward/backward passes."""
        self._capture = enabled
        self._captured: list = []

    def captured(self) -> tuple[Tensor, Tensor] | None:
        """(x [M, cols], dy [M, rows]) over the captured passes that completed a backward,
        or None if there are none."""
        done = [s for s in getattr(self, "_captured", []) if s[1] is not None]
        if not done:
            return None
        # Under autocast x may be fp32 (the op cast it) while dy is the autocast dtype:
        # growth scores are taken in the wider of the two.
        dtype = torch.promote_types(done[0][0].dtype, done[0][1].dtype)
        for s in done[1:]:
            dtype = torch.promote_types(dtype, torch.promote_types(s[0].dtype, s[1].dtype))
        if len(done) == 1:
            return done[0][0].to(dtype), done[0][1].to(dtype)
        return torch.cat([s[0].to(dtype) for s in done]), torch.cat([s[1].to(dtype) for s in done])

    @property
    def groups_layout(self) -> tuple[int, int, int]:
        """(groups, rows per group, columns per group) of the stored matrix: row r of
        group r // rows_per_group may only use columns of its group's block."""
        return 1, self._matrix_shape[0], self._matrix_shape[1]

    @property
    def nnz(self) -> int:
        """Number of stored (trainable) weights."""
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / self._dense_numel if self._dense_numel else 1.0

    @property
    def sparsity(self) -> float:
        """Fraction of the dense weight's entries that are not stored."""
        return 1.0 - self.density

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        check_loaded_pattern(self, state_dict, prefix, _PATTERN, self._matrix_shape)
        take_checkpoint_sizes(self, state_dict, prefix, _PATTERN)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _check_input(self, x: object) -> Tensor:
        """Type, dtype and device of a layer input; the layer checks the shape."""
        return check_layer_input(type(self).__name__, x, self.values)
