"""Fixed-width bit packing of small unsigned integer codes into bytes (the wire format)."""

from __future__ import annotations

import torch
from torch import Tensor


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take when packed."""
    return (n * bits + 7) // 8


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """``codes`` [n] integers in [0, 2^bits) → uint8 [ceil(n·bits/8)], little-endian bit
    order (bit j of code i is bit i·bits + j of the stream)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"pack_bits: bits must be in [1, 16], got {bits}")
    n = codes.numel()
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    stream = ((codes.reshape(-1, 1).to(torch.int32) >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32)).to(torch.uint8)
    out = (stream.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)
    assert out.numel() == packed_nbytes(n, bits)
    return out


def unpack_bits(data: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 stream → int32 [n] codes."""
    shifts = torch.arange(8, device=data.device, dtype=torch.int32)
    stream = ((data.reshape(-1, 1).to(torch.int32) >> shifts) & 1).reshape(-1)[: n * bits]
    weights = 1 << torch.arange(bits, device=data.device, dtype=torch.int32)
    return (stream.view(n, bits) * weights).sum(dim=1, dtype=torch.int32)
