"""Triton BSR matmuls for a block-sparse weight W [N, K] with b x b blocks (b = 16/32/64):

    bsr_mm     y  = x W^T   program (block row, batch tile): sum over the row's blocks of
                            x[m, blk] @ W_blk^T, a tl.dot per block (tensor cores in 16 bit)
    bsr_mm_t   dx = dy W    the same over W^T's block rows (transpose map, values via t_perm)
    bsr_sddmm  dW_blk = dy[:, row]^T @ x[:, col] for every stored block, one program each

fp32 dots use input_precision="ieee" (no TF32) so fp32 results match the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...reference import csr_rows
from ._config import configs


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# The H200 run (12-04) had only the first three configs: 32 x 32 blocks, bf16, B = 2048 at
# 90% took 0.26 ms against cuBLAS's 0.10. Larger batch tiles and deeper pipelines let each
# block's W tile serve more rows of x and overlap the x loads with the dots; the
# autotuner keeps the fastest per (M, block rows, block size, W or W^T).
@triton.autotune(configs=configs([{"BLOCK_M": 64}, {"BLOCK_M": 128, "num_warps": 8}, {"BLOCK_M": 32},
                                  {"BLOCK_M": 128, "num_warps": 4, "num_stages": 4},
                                  {"BLOCK_M": 256, "num_warps": 8, "num_stages": 3},
                                  {"BLOCK_M": 64, "num_warps": 4, "num_stages": 5}],
                                 interpreted={"BLOCK_M": 16}), key=["M", "NB", "B", "TRANS_W"])
@triton.jit
def _bsr_rows_kernel(x_ptr, y_ptr, vals_ptr, perm_ptr, crow_ptr, ccol_ptr, M, NB, stride_x, stride_y,
                     B: tl.constexpr, TRANS_W: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    brow = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, B)
    mask_m = offs_m < M
    start = tl.load(crow_ptr + brow)
    end = tl.load(crow_ptr + brow + 1)
    acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    for j in range(start, end):
        bcol = tl.load(ccol_ptr + j).to(tl.int64)
        src = tl.load(perm_ptr + j).to(tl.int64)  # identity for W, t_perm for W^T
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_x + bcol * B + offs_b[None, :],
                    mask=mask_m[:, None], other=0.0)
        w = tl.load(vals_ptr + src * B * B + offs_b[:, None] * B + offs_b[None, :])   # [B(o), B(k)]
        if TRANS_W:
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)   # y += x W_blk^T
        else:
            acc += tl.dot(x, w, input_precision=PRECISION)             # dx += dy W_blk
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_y + brow * B + offs_b[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None])


@triton.autotune(configs=configs([{"BLOCK_M": 64}, {"BLOCK_M": 128, "num_warps": 8},
                                  {"BLOCK_M": 128, "num_warps": 4, "num_stages": 4}],
                                 interpreted={"BLOCK_M": 16}), key=["M", "B"])
@triton.jit
def _bsr_sddmm_kernel(dy_ptr, x_ptr, out_ptr, brow_ptr, ccol_ptr, M, stride_dy, stride_x,
                      B: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    blk = tl.program_id(0)
    brow = tl.load(brow_ptr + blk).to(tl.int64)
    bcol = tl.load(ccol_ptr + blk).to(tl.int64)
    offs_b = tl.arange(0, B)
    acc = tl.zeros((B, B), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        dy = tl.load(dy_ptr + offs_m[:, None].to(tl.int64) * stride_dy + brow * B + offs_b[None, :],
                     mask=mask_m[:, None], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_x + bcol * B + offs_b[None, :],
                    mask=mask_m[:, None], other=0.0)
        acc += tl.dot(tl.trans(dy), x, input_precision=PRECISION)
    tl.store(out_ptr + blk.to(tl.int64) * B * B + offs_b[:, None] * B + offs_b[None, :],
             acc.to(out_ptr.dtype.element_ty))


def _rows(x: Tensor, values: Tensor, crow: Tensor, ccol: Tensor, perm: Tensor | None, n_out: int,
          trans_w: bool) -> Tensor:
    b = values.shape[-1]
    lead, k = x.shape[:-1], x.shape[-1]
    m = lead.numel()
    nb_rows = crow.numel() - 1
    if m == 0 or values.shape[0] == 0:
        return x.new_zeros((*lead, n_out))
    x2 = x.reshape(m, k).contiguous()
    y = torch.empty((m, n_out), dtype=x.dtype, device=x.device)

    def grid(meta):
        return (nb_rows, triton.cdiv(m, meta["BLOCK_M"]))

    if perm is None:
        perm = torch.arange(values.shape[0], dtype=torch.int32, device=values.device)
    _bsr_rows_kernel[grid](x2, y, values.contiguous(), perm.contiguous(), crow.contiguous(), ccol.contiguous(), m, nb_rows,
                           x2.stride(0), y.stride(0), B=b, TRANS_W=trans_w,
                           PRECISION=_dot_precision(x.dtype))
    return y.reshape(*lead, n_out)


def bsr_mm(x, values, crow, ccol, t_crow, t_ccol, t_perm):
    """y [..., N] = x [..., K] W^T."""
    return _rows(x, values, crow, ccol, None, (crow.numel() - 1) * values.shape[-1], trans_w=True)


def bsr_mm_t(dy, values, crow, ccol, t_crow, t_ccol, t_perm):
    """dx [..., K] = dy [..., N] W, over W^T's block rows."""
    return _rows(dy, values, t_crow, t_ccol, t_perm, (t_crow.numel() - 1) * values.shape[-1], trans_w=False)


def bsr_sddmm(dy, x, crow, ccol, t_crow, t_ccol, t_perm, values_like: Tensor):
    """dvalues [nb, b, b] = dy[:, row blk]^T @ x[:, col blk] for every stored block."""
    nb, b = values_like.shape[0], values_like.shape[-1]
    out = torch.zeros((nb, b, b), dtype=dy.dtype, device=dy.device)
    m = dy.shape[:-1].numel()
    if nb == 0 or m == 0:
        return out
    dy2 = dy.reshape(m, dy.shape[-1]).contiguous()
    x2 = x.reshape(m, x.shape[-1]).contiguous()
    brow = csr_rows(crow).to(torch.int32)
    _bsr_sddmm_kernel[(nb,)](dy2, x2, out, brow, ccol.contiguous(), m, dy2.stride(0), x2.stride(0), B=b,
                             PRECISION=_dot_precision(dy.dtype))
    return out
