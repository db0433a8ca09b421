"""Sparse24Linear: ``nn.Linear`` with a 2:4 semi-structured weight; what
``SparseLinear(..., format="2:4")`` builds. Two training modes:

* ``mode="fixed"``: the trainable parameter is ``values [out, in/2]`` (the compressed
  weight); forward on the 2:4 kernel, input gradient through W^T's CSR, weight gradient
  at the kept positions only. The mask never changes.
* ``mode="srste"`` (Zhou et al. 2021): the trainable parameter is the dense master
  ``weight [out, in]``; the 2:4 mask is recomputed from |weight| every ``update_every``
  training forwards, the forward runs on the compressed weight, and the gradient is
  dW = dy^T x + lambda_w * (1 - E) * W (straight-through plus sparse-refined decay).
  Inside functorch transforms (``torch.func.grad``, ``vmap``) the forward is a pure
  function: it uses the stored mask and does not count towards ``update_every``. The
  decay is added once per call of the product, so ``grad(vmap(...))`` over B entries
  adds it B times.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_int
from ..formats import CSR, Sparse24, compress_24, is_24
from ..formats.sparse24 import check_24_shape, check_meta_bytes
from ..ops import sparse24_mm
from ..ops.sparse24 import check_srste_lambda, srste_product
from ..ops._functorch import transforms_active
from ..reference import meta_columns
from ._sparse_weight import (CompressedWeightModule, carry_flags, check_features, check_layer_input, check_not_meta,
                             dense_linear)

MODES = ("fixed", "srste")

_BUFFERS = ("meta", "row_ptr", "col_idx", "t_row_ptr", "t_col_idx", "t_perm")


class Sparse24Linear(CompressedWeightModule):
    """``y = x W^T + b`` with W [out, in] 2:4 sparse along ``in`` (in % 4 == 0).

    Args:
        mode: ``"fixed"`` or ``"srste"`` (see module docstring).
        srste_lambda: lambda_w of SR-STE (default 2e-4).
        update_every: SR-STE recomputes the mask every this many training forwards.
        transposable: prune each 4x4 tile 2:4 along rows and columns, so W^T is 2:4 too.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mode: str = "fixed",
                 srste_lambda: float = 2e-4, update_every: int = 1, transposable: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        check_features("Sparse24Linear", in_features, out_features)
        check_not_meta("Sparse24Linear", device)
        self._configure(in_features, out_features, mode, srste_lambda, update_every, transposable, device)
        dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_from(dense.weight.detach(), None)
        self.bias = dense.bias

    def _configure(self, in_f, out_f, mode, lam, update_every, transposable, device=None):
        check_24_shape((out_f, in_f))
        if mode not in MODES:
            raise ValueError(f"Sparse24Linear: mode must be one of {MODES}, got {mode!r}")
        check_int("update_every", update_every, "Sparse24Linear")
        check_srste_lambda("Sparse24Linear", "srste_lambda", lam)
        if transposable and out_f % 4:
            raise ValueError(f"Sparse24Linear: transposable 2:4 needs out_features divisible by 4, got {out_f}")
        self.in_features, self.out_features = in_f, out_f
        self.mode, self.srste_lambda, self.update_every, self.transposable = mode, float(lam), update_every, transposable
        # SR-STE's count of training forwards, as a tensor: torch.compile traces its
        # increment into the graph, where a Python int was a constant every graph guarded
        # on (one recompile per step, and past the recompile limit the whole model ran
        # uncompiled). Not in the state_dict (the SRSTE method's state carries it).
        self.register_buffer("_forward_count", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        # Its value on the host, for update_every > 1 (read every forward: from a GPU tensor
        # that would be a device sync per step); stale after counting on the device alone.
        self._host_count, self._host_count_valid = 0, True
        self.freeze_mask = False  # SR-STE: stop recomputing the mask (kept at its last value)

    def _set_pattern(self, weight: Tensor, mask: Tensor | None) -> Sparse24:
        """Compresses ``weight`` at ``mask`` (None: prune by magnitude, one pass) and stores
        meta, the boolean mask and, in fixed mode, the CSR view the backward products use.
        (SR-STE needs no CSR view: its mask changes every update and a transpose map per
        step would cost more than the product.)"""
        if mask is None:
            s24, mask = compress_24(weight, self.transposable)  # the kernel's mask: no re-expansion
        else:
            s24 = Sparse24.from_dense(weight, mask)
            mask = s24.mask()  # positions as stored (the given mask may keep fewer than 2 of 4)
        tensors = {"meta": s24.meta}
        if self.mode == "fixed":
            tensors.update(zip(_BUFFERS[1:], self._csr_view(s24.meta)))
        for name, t in tensors.items():
            if name in self._buffers:
                setattr(self, name, t)
            else:
                self.register_buffer(name, t)
        self.register_buffer("stored_mask", mask, persistent=False)
        return s24

    def _csr_view(self, meta: Tensor) -> tuple[Tensor, ...]:
        """The CSR pattern (row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm) of the positions
        ``meta`` [out, in/4] keeps, in values' order."""
        cols = meta_columns(meta)
        rows = torch.arange(self.out_features, device=meta.device).repeat_interleave(cols.shape[1])
        return CSR.from_indices(torch.empty(rows.shape[0], device=meta.device), rows, cols.reshape(-1),
                                (self.out_features, self.in_features), check=False).pattern()

    def _check_transposable(self, mask: Tensor, where: str) -> None:
        # The GPU input gradient runs W^T on the 2:4 GEMM: a W^T that is not 2:4 would give
        # a silently wrong gradient, so a layer declared transposable must really be.
        if self.transposable and not is_24(mask, dim=0):
            raise ValueError(f"Sparse24Linear: transposable=True needs a mask that is 2:4 along columns too "
                             f"(W^T 2:4), but the {where} is not; use prune_24_transposable or transposable=False")

    def _init_from(self, weight: Tensor, mask: Tensor | None) -> None:
        if mask is not None:
            self._check_transposable(mask, "given mask")
        s24 = self._set_pattern(weight, mask)
        if self.mode == "fixed":
            self.values = nn.Parameter(s24.values.clone())
        else:
            self.weight = nn.Parameter(weight.clone())

    def reset_parameters(self) -> None:
        """Draws the weights anew as the constructor does: ``nn.Linear``'s initialization
        (uniform, bound 1 / sqrt(in_features), the bias too) pruned 2:4 by magnitude, so the
        pattern is drawn anew with them (values, meta and the CSR view in fixed mode; the
        weight and its mask with SR-STE). The parameters stay the same objects, so an
        optimizer built on them keeps working."""
        held = self.values if self.mode == "fixed" else self.weight
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=held.device,
                          dtype=held.dtype)
        with torch.no_grad():
            kept = self._set_pattern(dense.weight, None).values
            held.copy_(kept if self.mode == "fixed" else dense.weight)
            if self.bias is not None:
                self.bias.copy_(dense.bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, mask: Tensor | None = None, mode: str = "fixed",
                   srste_lambda: float = 2e-4, update_every: int = 1, transposable: bool = False) -> "Sparse24Linear":
        """From an ``nn.Linear``: keeps ``mask`` (must be 2:4) or the 2:4 magnitude mask."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Sparse24Linear.from_dense: expected an nn.Linear, got {type(linear).__name__}")
        check_not_meta("Sparse24Linear.from_dense", linear.weight.device)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._configure(linear.in_features, linear.out_features, mode, srste_lambda, update_every, transposable,
                         linear.weight.device)
        layer._init_from(linear.weight.detach(), mask)
        layer.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        return carry_flags(linear, layer)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint's meta is checked before anything is loaded: a bad byte would index
        # out of the group when the mask is rebuilt, or pick wrong columns in the kernels.
        # The CSR view is derived from meta; a stored one that differs is refused rather
        # than let the backward products use another pattern than the forward.
        owner = f"Sparse24Linear.load_state_dict ({prefix.rstrip('.') or 'root'})"
        meta = state_dict.get(prefix + "meta")
        if meta is not None:
            want = (self.out_features, self.in_features // 4)
            if not isinstance(meta, Tensor) or meta.dtype != torch.uint8 or tuple(meta.shape) != want:
                got = (f"{meta.dtype} {tuple(meta.shape)}" if isinstance(meta, Tensor) else type(meta).__name__)
                raise ValueError(f"{owner}: meta must be a uint8 tensor of shape {want}, got {got}")
            check_meta_bytes(owner, meta)
            stored = [prefix + n for n in _BUFFERS[1:]]
            if self.mode == "fixed" and all(k in state_dict for k in stored):
                for key, derived in zip(stored, self._csr_view(meta)):
                    t = state_dict[key]
                    if not (isinstance(t, Tensor) and t.shape == derived.shape
                            and torch.equal(t.to(derived.device, torch.int64), derived.long())):
                        raise ValueError(f"{owner}: {key[len(prefix):]} is not the CSR view of meta")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The mask is derived from meta (not saved twice): rebuild it from the loaded meta.
        mask = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=self.meta.device)
        mask = mask.scatter(1, meta_columns(self.meta), True)
        self._check_transposable(mask, "loaded meta")
        self.stored_mask = mask

    # ------------------------------------------------------------------ views
    def mask(self) -> Tensor:
        """Boolean [out, in] of the stored positions."""
        return self.stored_mask.clone()

    def dense_weight(self) -> Tensor:
        """The effective (2:4-pruned) weight [out, in], no grad."""
        if self.mode == "fixed":
            return Sparse24(self.values.detach(), self.meta, (self.out_features, self.in_features)).to_dense()
        return self.weight.detach() * self.stored_mask

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the effective (2:4-pruned) weight."""
        return carry_flags(self, dense_linear(self.dense_weight(), self.bias, self.training))

    @property
    def nnz(self) -> int:
        return self.out_features * self.in_features // 2

    @property
    def sparsity(self) -> float:
        return 0.5

    # ------------------------------------------------------------------ forward
    @property
    def _forwards(self) -> int:
        """SR-STE: training forwards counted so far (the mask is recomputed at multiples of
        ``update_every``)."""
        return int(self._forward_count)

    @_forwards.setter
    def _forwards(self, count: int) -> None:
        self._forward_count.fill_(count)
        self._host_count, self._host_count_valid = int(count), True

    def _count_forward(self) -> Tensor | None:
        """SR-STE: counts a training forward and, every ``update_every``, prunes the current
        weight again; returns the new kept values [out, in/2] then (None otherwise)."""
        if self.update_every == 1:  # every forward: no decision on the count, one graph under torch.compile
            kept = self._set_pattern(self.weight.detach(), None).values
            self._forward_count.add_(1)
            self._host_count_valid = False
            return kept
        return self._count_forward_every()

    @torch.compiler.disable
    def _count_forward_every(self) -> Tensor | None:
        # Which forward this is decides whether to prune: under torch.compile that runs
        # here, between graphs (a graph break), not as a guard on the count.
        if not self._host_count_valid:  # counted on the device since (update_every was 1)
            self._host_count, self._host_count_valid = int(self._forward_count), True
        kept = None
        if self._host_count % self.update_every == 0:
            # Pruned from the current weight just now: its compressed values are the kept
            # weights (no second gather).
            kept = self._set_pattern(self.weight.detach(), None).values
        self._forward_count.add_(1)
        self._host_count += 1
        return kept

    def forward(self, input: Tensor) -> Tensor:
        check_layer_input("Sparse24Linear", input, self.values if self.mode == "fixed" else self.weight,
                          self.in_features)
        if self.mode == "fixed":
            # Bias fused into the GEMM where the backend can; with a transposable mask the
            # input gradient runs on sparse tensor cores too (GPU).
            pattern = (self.row_ptr, self.col_idx, self.t_row_ptr, self.t_col_idx, self.t_perm)
            return sparse24_mm(input, self.values, self.meta, *pattern, self.bias, transposable=self.transposable)
        kept = None
        # Not under functorch transforms (torch.func.grad, vmap): they run the forward as a
        # pure function of wrapped tensors, which the mask update would store in this
        # layer's buffers (and under vmap over weights one mask would serve every entry).
        if (self.training and torch.is_grad_enabled() and not self.freeze_mask
                and not transforms_active()):
            kept = self._count_forward()
        return srste_product(input, self.weight, self.meta, self.stored_mask, self.srste_lambda, bias=self.bias,
                             transposable=self.transposable, kept_values=kept)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode}, transposable={self.transposable}")
