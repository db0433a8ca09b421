"""SparseConv2d: a drop-in ``nn.Conv2d`` whose weight is stored (and trained) as CSR.

The weight [out, in/groups, kh, kw] is the matrix [out, in/groups * kh * kw]; the
convolution is unfold (im2col) followed by the sparse matmul. Grouped convolutions are
one block-diagonal matrix over the unfolded input [.., in * kh * kw]: a row of group g
has its column indices shifted by g * (in/groups) * kh * kw, so every group runs in a
single kernel call. ``col_idx`` therefore indexes unfolded input columns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from ..formats import CSR, check_sparsity, random_mask
from ..ops import spmm, spmm_t
from ..ops._functorch import tangents_possible, transforms_active
from ._sparse_weight import SparseWeightMixin, carry_flags, check_not_meta, kept_mask

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _int_pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    """An ``nn.Conv2d`` size argument (an int, or a pair of ints) as a pair, each at least
    ``minimum``; a float, a bool or a pair of another length is refused here rather than
    failing later in unfold or pad."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair):
        kind = "a positive int" if minimum > 0 else "a non-negative int"
        raise ValueError(f"SparseConv2d: {name} must be {kind} or a pair of them, got {value!r}")
    return pair


class _Fp32InputGrad(torch.autograd.Function):
    """Identity (a copy) on the product ``y`` [N, L, out] of a fp16 / bf16 convolution, whose
    backward also forms the input gradient in fp32: dcols = dy @ W (spmm_t) and the fold that sums
    the overlapping patches into dx, rounded once at the end, as a dense convolution's input
    gradient is. (Through the op's own backward, dcols was rounded to bf16 and the fold
    summed in bf16: ~2.5x a dense bf16 convolution's error; with only the fold in fp32 still
    ~1.45x.) The product itself is formed from a detached unfold, so the weight gradient and
    the regrowth capture keep running through the layer's sparse matmul.

    Inputs: y [N, L, out], x [N, C, H, W] (the padded input), values [nnz] and the pattern;
    ``geometry`` = ((H, W), kernel_size, dilation, stride)."""

    # forward / setup_context kept apart, as functorch transforms (torch.func.grad) require;
    # vmap (per-sample gradients) runs forward and backward batched.
    generate_vmap_rule = True

    @staticmethod
    def forward(y: Tensor, x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor,
                t_col_idx: Tensor, t_perm: Tensor, geometry) -> Tensor:
        # A copy, not a view: autograd forbids in-place ops (ReLU(inplace=True) right after
        # the convolution) on views of a custom Function's input.
        return y.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, x, *weight, geometry = inputs
        ctx.save_for_backward(*weight)  # values and the pattern
        ctx.geometry, ctx.x_dtype = geometry, x.dtype

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, *pattern = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[1]:
            size, kernel_size, dilation, stride = ctx.geometry
            dcols = spmm_t(grad.float(), values.detach().float(), *pattern)            # [N, L, C*kh*kw]
            dx = F.fold(dcols.transpose(1, 2), size, kernel_size, dilation=dilation, stride=stride).to(ctx.x_dtype)
        return grad, dx, None, None, None, None, None, None, None


class _Fp32InputGradForwardMode(_Fp32InputGrad):
    """_Fp32InputGrad with its forward-mode rule, used only where tangents are possible
    (``_functorch.tangents_possible``): dynamo cannot trace a Function that defines ``jvp``."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _Fp32InputGrad.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[2:8])  # values and the pattern

    @staticmethod
    def jvp(ctx, ty, tx, *_):
        # y was formed from a detached unfold of x: x's tangent enters here, as its
        # gradient leaves in backward (values' tangent reached y through the product).
        if tx is None:
            return ty
        values, *pattern = ctx.saved_tensors
        _, kernel_size, dilation, stride = ctx.geometry
        cols = F.unfold(tx, kernel_size, dilation=dilation, stride=stride).transpose(1, 2)
        t = spmm(cols, values, *pattern).to(ty.dtype if ty is not None else tx.dtype)
        return t if ty is None else ty + t


class SparseConv2d(SparseWeightMixin):
    """2-D convolution with a sparse weight; arguments as ``nn.Conv2d`` plus ``sparsity``.

    Input [N, C_in, H, W] or [C_in, H, W] -> output [N, C_out, H_out, W_out] (or without N).
    The trainable parameter is ``values`` [nnz] (see :class:`SparseLinear`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, sparsity: float = 0.9,
                 device=None, dtype=None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self._configure(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        check_not_meta("SparseConv2d", device)
        sparsity = check_sparsity(sparsity)
        factory = {"device": device, "dtype": dtype if dtype is not None else torch.get_default_dtype()}
        mask = random_mask(self.weight_shape, sparsity, device=device, generator=generator)
        self._init_from_masked(torch.zeros(self.weight_shape, **factory), mask)
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    # ------------------------------------------------------------------ configuration
    def _configure(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode):
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            check_int(name, v, "SparseConv2d")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"SparseConv2d: in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"SparseConv2d: padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _int_pair("kernel_size", kernel_size, 1)
        self.stride, self.dilation = _int_pair("stride", stride, 1), _int_pair("dilation", dilation, 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"SparseConv2d: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("SparseConv2d: padding='same' needs stride 1 (as nn.Conv2d)")
            self.padding = padding
        else:
            self.padding = _int_pair("padding", padding, 0)
        self.padding_mode = padding_mode
        kh, kw = self.kernel_size
        self.weight_shape = (out_channels, in_channels // groups, kh, kw)
        # F.pad order (left, right, top, bottom) of the explicit padding.
        if self.padding == "valid":
            self._pad = (0, 0, 0, 0)
        elif self.padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            self._pad = (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
        else:
            self._pad = (self.padding[1], self.padding[1], self.padding[0], self.padding[0])

    def _block_diagonal_cols(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Column in the unfolded input of each entry (group offset added)."""
        per_group_out = self.out_channels // self.groups
        per_group_cols = self.weight_shape[1] * self.weight_shape[2] * self.weight_shape[3]
        return cols + (rows // per_group_out) * per_group_cols

    def _init_from_masked(self, weight: Tensor, mask: Tensor) -> None:
        w2 = weight.reshape(self.out_channels, -1)
        rows, cols = mask.reshape(self.out_channels, -1).nonzero(as_tuple=True)
        unfolded_cols = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        csr = CSR.from_indices(w2[rows, cols], rows, self._block_diagonal_cols(rows, cols),
                               (self.out_channels, unfolded_cols), check=False)
        self._init_sparse_weight(csr, dense_numel=math.prod(self.weight_shape))

    @property
    def groups_layout(self) -> tuple[int, int, int]:
        return self.groups, self.out_channels // self.groups, self.weight_shape[1] * self.weight_shape[2] * self.weight_shape[3]

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_dense(cls, conv: nn.Conv2d, *, sparsity: float | None = None, mask: Tensor | None = None) -> "SparseConv2d":
        """A SparseConv2d holding ``conv``'s weights at the kept positions: ``mask``
        [out, in/groups, kh, kw] if given, else the largest-magnitude weights at ``sparsity``,
        else the non-zero weights."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"SparseConv2d.from_dense: expected an nn.Conv2d, got {type(conv).__name__}")
        w = conv.weight.detach()
        check_not_meta("SparseConv2d.from_dense", w.device)
        mask = kept_mask("SparseConv2d.from_dense", w, sparsity, mask)
        layer = cls.__new__(cls)
        SparseWeightMixin.__init__(layer)
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        layer._configure(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding,
                         conv.dilation, conv.groups, conv.padding_mode)
        layer._init_from_masked(w, mask.to(device=w.device, dtype=torch.bool))
        layer.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        carry_flags(conv, layer)
        return layer

    def dense_weight(self) -> Tensor:
        """The weight [out, in/groups, kh, kw] with zeros where pruned (no grad)."""
        rows = self.csr().rows()
        per_group_out = self.out_channels // self.groups
        per_group_cols = self.weight_shape[1] * self.weight_shape[2] * self.weight_shape[3]
        cols = self.col_idx.long() - (rows // per_group_out) * per_group_cols
        w = torch.zeros(self.out_channels, per_group_cols, dtype=self.values.dtype, device=self.values.device)
        w[rows, cols] = self.values.detach()
        return w.view(self.weight_shape)

    def mask(self) -> Tensor:
        """Boolean [out, in/groups, kh, kw] pattern."""
        rows = self.csr().rows()
        per_group_out = self.out_channels // self.groups
        per_group_cols = self.weight_shape[1] * self.weight_shape[2] * self.weight_shape[3]
        m = torch.zeros(self.out_channels, per_group_cols, dtype=torch.bool, device=self.values.device)
        m[rows, self.col_idx.long() - (rows // per_group_out) * per_group_cols] = True
        return m.view(self.weight_shape)

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with this layer's weights and zeros where pruned."""
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, self.groups, self.bias is not None, self.padding_mode,
                          device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return carry_flags(self, dense)

    # ------------------------------------------------------------------ forward
    def forward(self, input: Tensor) -> Tensor:
        x = self._check_input(input)
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"SparseConv2d: input must have shape [N, {self.in_channels}, H, W] or "
                             f"[{self.in_channels}, H, W], got {tuple(x.shape)}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if any(self._pad):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._pad, mode=mode)
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        h_out = (h - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        w_out = (w - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if h_out <= 0 or w_out <= 0:
            raise ValueError(f"SparseConv2d: input {tuple(input.shape)} is smaller than the (dilated) kernel")
        low = x.dtype in (torch.float16, torch.bfloat16) and x.requires_grad and torch.is_grad_enabled()
        # fp16 / bf16 input gradient in fp32 (see _Fp32InputGrad): the product runs on a
        # detached unfold and the bridge supplies dx.
        cols = F.unfold(x.detach() if low else x, self.kernel_size, dilation=self.dilation,
                        stride=self.stride)  # [N, C*kh*kw, L]
        # The bias goes into the product (cast with it under autocast, as nn.Conv2d's): the
        # CPU kernel adds it as it writes y, instead of a y + bias pass making a new [N, L, out].
        y = self._matmul(cols.transpose(1, 2), self.bias)  # [N, L, out]
        if low:
            bridge = _Fp32InputGradForwardMode if tangents_possible() else _Fp32InputGrad
            y = bridge.apply(y, x, self.values, self.row_ptr, self.col_idx, self.t_row_ptr, self.t_col_idx,
                                     self.t_perm, ((h, w), self.kernel_size, self.dilation, self.stride))
        y = y.transpose(1, 2).reshape(n, self.out_channels, h_out, w_out)  # channels_last strides
        # The output's memory format follows the input's, as nn.Conv2d's: a contiguous input
        # gets a contiguous output (code after a convolution flattens with .view). Under
        # functorch transforms (vmap) only the contiguous format can be asked about.
        if unbatched or input.is_contiguous() or transforms_active() or \
                not input.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous()
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + f", sparsity={self.sparsity:.4f}, nnz={self.nnz}"
