"""Triton CSR spmm / spmm_t: y = x W^T and dx = dy W for a CSR weight W [N, K].

Layout: the dense operand is transposed once to X^T [K, M] so that a non-zero w[n, k]
reads one contiguous strip X^T[k, m0:m0+BLOCK_M]. A program owns one CSR row and one
strip of the batch; it walks the row's non-zeros BLOCK_E at a time, gathers a
[BLOCK_E, BLOCK_M] tile and reduces it into an fp32 accumulator. spmm_t runs the same
kernel on W^T's CSR (the transpose map) with values read through t_perm. Rows are taken
longest first and column indices read as int16 where they fit (``launch_plan``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..launch_plan import launch_plan
from ._config import acc_type, configs


@triton.autotune(
    configs=configs([{"BLOCK_M": 64, "BLOCK_E": 32}, {"BLOCK_M": 128, "BLOCK_E": 16},
                     {"BLOCK_M": 32, "BLOCK_E": 64}, {"BLOCK_M": 256, "BLOCK_E": 8, "num_warps": 8}],
                    interpreted={"BLOCK_M": 16, "BLOCK_E": 8}),
    key=["M", "N"],
)
@triton.jit
def _csr_rows_kernel(xt_ptr, yt_ptr, vals_ptr, perm_ptr, row_ptr, col_ptr, order_ptr, M, N, stride_xt, stride_yt,
                     HAS_PERM: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # Programs take rows longest first (launch plan): long rows start early, the tail is short.
    row = tl.load(order_ptr + tl.program_id(0))
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    start = tl.load(row_ptr + row)
    end = tl.load(row_ptr + row + 1)
    acc = tl.zeros((BLOCK_M,), dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        cols = tl.load(col_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
        if HAS_PERM:
            src = tl.load(perm_ptr + offs_e, mask=mask_e, other=0)
        else:
            src = offs_e
        w = tl.load(vals_ptr + src, mask=mask_e, other=0.0).to(ACC)
        x = tl.load(xt_ptr + cols[:, None] * stride_xt + offs_m[None, :],
                    mask=mask_e[:, None] & mask_m[None, :], other=0.0).to(ACC)
        acc += tl.sum(w[:, None] * x, axis=0)
    tl.store(yt_ptr + row.to(tl.int64) * stride_yt + offs_m, acc.to(yt_ptr.dtype.element_ty), mask=mask_m)


def _rows_mm(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, perm: Tensor | None) -> Tensor:
    """x [..., K] times the transpose of the CSR matrix (values[perm], row_ptr, col_idx) [N, K]."""
    n, k = row_ptr.numel() - 1, x.shape[-1]
    lead = x.shape[:-1]
    m = lead.numel()
    if m == 0 or n == 0 or values.numel() == 0 or k == 0:
        return x.new_zeros((*lead, n))
    xt = x.reshape(m, k).t().contiguous()                      # [K, M]
    # The kernel indexes these as flat arrays: strides other than 1 would be misread.
    values, row_ptr, col_idx = values.contiguous(), row_ptr.contiguous(), col_idx.contiguous()
    perm = perm.contiguous() if perm is not None else None
    order, cols = launch_plan(row_ptr, col_idx, k)             # rows longest first, int16 columns
    yt = torch.empty((n, m), dtype=x.dtype, device=x.device)   # [N, M]

    def grid(meta):
        return (n, triton.cdiv(m, meta["BLOCK_M"]))

    _csr_rows_kernel[grid](xt, yt, values, perm if perm is not None else cols, row_ptr, cols, order, m, n,
                           xt.stride(0), yt.stride(0), HAS_PERM=perm is not None, ACC=acc_type(x.dtype))
    return yt.t().contiguous().view(*lead, n)  # contiguous, as the fake implementation


def spmm(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor, t_col_idx: Tensor,
         t_perm: Tensor) -> Tensor:
    """y [..., N] = x [..., K] W^T."""
    return _rows_mm(x, values, row_ptr, col_idx, None)


def spmm_t(dy: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor, t_col_idx: Tensor,
           t_perm: Tensor) -> Tensor:
    """dx [..., K] = dy [..., N] W, through W^T's CSR; values are read via t_perm."""
    return _rows_mm(dy, values, t_row_ptr, t_col_idx, t_perm)
