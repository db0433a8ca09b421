"""Triton CSR sddmm: dvalues[e] = sum_m dy[m, row(e)] * x[m, col(e)].

Both operands are transposed once ([N, M] and [K, M]) so each non-zero is a dot product
of two contiguous rows. A program owns BLOCK_E consecutive non-zeros and sweeps the
batch BLOCK_M at a time, accumulating in fp32; each non-zero is written by one program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..launch_plan import launch_plan, nonzero_rows
from ._config import acc_type, configs


@triton.autotune(
    configs=configs([{"BLOCK_E": 32, "BLOCK_M": 64}, {"BLOCK_E": 64, "BLOCK_M": 32},
                     {"BLOCK_E": 16, "BLOCK_M": 128}, {"BLOCK_E": 128, "BLOCK_M": 32, "num_warps": 8}],
                    interpreted={"BLOCK_E": 8, "BLOCK_M": 16}),
    key=["NNZ", "M"],
)
@triton.jit
def _sddmm_kernel(dyt_ptr, xt_ptr, out_ptr, rows_ptr, cols_ptr, NNZ, M, stride_dyt, stride_xt, ACC: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < NNZ
    rows = tl.load(rows_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
    cols = tl.load(cols_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_E,), dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = mask_e[:, None] & (offs_m < M)[None, :]
        a = tl.load(dyt_ptr + rows[:, None] * stride_dyt + offs_m[None, :], mask=mask, other=0.0).to(ACC)
        b = tl.load(xt_ptr + cols[:, None] * stride_xt + offs_m[None, :], mask=mask, other=0.0).to(ACC)
        acc += tl.sum(a * b, axis=1)
    tl.store(out_ptr + offs_e, acc.to(out_ptr.dtype.element_ty), mask=mask_e)


def sddmm(dy: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor, t_row_ptr: Tensor, t_col_idx: Tensor,
          t_perm: Tensor) -> Tensor:
    """dvalues [nnz] of dy's dtype; dy [..., N], x [..., K] with equal leading dims."""
    nnz = col_idx.numel()
    n, k = dy.shape[-1], x.shape[-1]
    m = dy.shape[:-1].numel()
    out = torch.zeros(nnz, dtype=dy.dtype, device=dy.device)
    if nnz == 0 or m == 0:
        return out
    dyt = dy.reshape(m, n).t().contiguous()
    xt = x.reshape(m, k).t().contiguous()
    rows = nonzero_rows(row_ptr, col_idx)         # cached per pattern
    cols = launch_plan(row_ptr, col_idx, k)[1]    # int16 where the columns fit

    def grid(meta):
        return (triton.cdiv(nnz, meta["BLOCK_E"]),)

    _sddmm_kernel[grid](dyt, xt, out, rows, cols.contiguous(), nnz, m, dyt.stride(0), xt.stride(0), ACC=acc_type(dy.dtype))
    return out
