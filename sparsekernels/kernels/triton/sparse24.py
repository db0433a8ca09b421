"""Triton 2:4 prune + compress: one program per block of (row, group) pairs reads the 4
weights of each group once, keeps the two largest |w| (NaN highest, earlier position on
ties: the order documented in ``sparsekernels.formats.sparse24``), and writes values
[N, K/2], meta [N, K/4] (uint8, i0 | i1 << 2) and the bool mask [N, K].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._config import configs


@triton.autotune(configs=configs([{"BLOCK": 256}, {"BLOCK": 1024, "num_warps": 8}], interpreted={"BLOCK": 32}),
                 key=["G"])
@triton.jit
def _compress_kernel(w_ptr, vals_ptr, meta_ptr, mask_ptr, G, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)     # flat group index (row-major)
    valid = offs < G
    base = offs.to(tl.int64) * 4
    w0 = tl.load(w_ptr + base + 0, mask=valid, other=0.0)
    w1 = tl.load(w_ptr + base + 1, mask=valid, other=0.0)
    w2 = tl.load(w_ptr + base + 2, mask=valid, other=0.0)
    w3 = tl.load(w_ptr + base + 3, mask=valid, other=0.0)
    # Magnitudes compared in fp32, fp64 in fp64 (WIDE): as the C++ kernel, so two fp64
    # weights that round to one fp32 number still rank by their true size.
    ct = tl.float64 if WIDE else tl.float32
    a0, a1, a2, a3 = tl.abs(w0.to(ct)), tl.abs(w1.to(ct)), tl.abs(w2.to(ct)), tl.abs(w3.to(ct))
    n0, n1, n2, n3 = a0 != a0, a1 != a1, a2 != a2, a3 != a3        # NaN flags
    # b_ij: entry i (earlier) beats entry j (later) in the documented order -- i is NaN, or
    # j is not NaN and |w_i| >= |w_j| (ties to the earlier position). Plain comparisons
    # are all false with a NaN, which let a group keep 3 or 4 entries.
    b01 = n0 | (~n1 & (a0 >= a1))
    b02 = n0 | (~n2 & (a0 >= a2))
    b03 = n0 | (~n3 & (a0 >= a3))
    b12 = n1 | (~n2 & (a1 >= a2))
    b13 = n1 | (~n3 & (a1 >= a3))
    b23 = n2 | (~n3 & (a2 >= a3))
    # Rank of each entry: how many others beat it. The order is total, so the ranks are a
    # permutation of 0..3 and exactly the two with rank < 2 are kept.
    r0 = (~b01).to(tl.int32) + (~b02).to(tl.int32) + (~b03).to(tl.int32)
    r1 = b01.to(tl.int32) + (~b12).to(tl.int32) + (~b13).to(tl.int32)
    r2 = b02.to(tl.int32) + b12.to(tl.int32) + (~b23).to(tl.int32)
    r3 = b03.to(tl.int32) + b13.to(tl.int32) + b23.to(tl.int32)
    k0, k1, k2, k3 = r0 < 2, r1 < 2, r2 < 2, r3 < 2
    # First kept position i0 and second i1 (i0 < i1).
    i0 = tl.where(k0, 0, tl.where(k1, 1, 2))
    i1 = tl.where(k3, 3, tl.where(k2, 2, 1))
    v0 = tl.where(i0 == 0, w0, tl.where(i0 == 1, w1, w2))
    v1 = tl.where(i1 == 3, w3, tl.where(i1 == 2, w2, w1))
    tl.store(vals_ptr + offs.to(tl.int64) * 2, v0, mask=valid)
    tl.store(vals_ptr + offs.to(tl.int64) * 2 + 1, v1, mask=valid)
    tl.store(meta_ptr + offs, (i0 | (i1 << 2)).to(tl.uint8), mask=valid)
    tl.store(mask_ptr + base + 0, k0.to(tl.int8), mask=valid)
    tl.store(mask_ptr + base + 1, k1.to(tl.int8), mask=valid)
    tl.store(mask_ptr + base + 2, k2.to(tl.int8), mask=valid)
    tl.store(mask_ptr + base + 3, k3.to(tl.int8), mask=valid)


def sparse24_compress(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(values [N, K/2], meta [N, K/4] uint8, mask [N, K] bool) of the magnitude 2:4 prune
    of a floating ``weight`` [N, K] (K % 4 == 0)."""
    if not weight.dtype.is_floating_point:
        raise TypeError(f"sparse24_compress: weight must have a floating dtype, got {weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(f"sparse24_compress: weight must be [N, K] with K divisible by 4, got {tuple(weight.shape)}")
    n, k = weight.shape
    w = weight.contiguous()
    values = torch.empty((n, k // 2), dtype=w.dtype, device=w.device)
    meta = torch.empty((n, k // 4), dtype=torch.uint8, device=w.device)
    mask = torch.empty((n, k), dtype=torch.int8, device=w.device)
    groups = n * k // 4
    if groups:
        _compress_kernel[lambda meta_: (triton.cdiv(groups, meta_["BLOCK"]),)](w, values, meta, mask, groups,
                                                                                   w.dtype == torch.float64)
    return values, meta, mask.bool()
