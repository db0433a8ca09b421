"""Fixed-width bit packing of small unsigned integer codes into bytes (the wire format)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_int


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take when packed."""
    return (n * bits + 7) // 8


def _check_bits(owner: str, bits: object) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"{owner}: bits must be an int in [1, 16], got {bits!r}")


def pack_bits(codes: Tensor, bits: int, *, check: bool = True) -> Tensor:
    """``codes`` [n] integers in [0, 2^bits) → uint8 [ceil(n·bits/8)], little-endian bit
    order (bit j of code i is bit i·bits + j of the stream)."""
    _check_bits("pack_bits", bits)
    if not isinstance(codes, Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack_bits: codes must be an integer tensor, got "
                        f"{codes.dtype if isinstance(codes, Tensor) else type(codes).__name__}")
    n = codes.numel()
    # A code out of range would lose its high bits on the wire, silently. (``check=False``:
    # the package's own encoders, whose codes are in range by construction; the check
    # reads the codes back to the host, a device sync per bucket in a DDP hook.)
    if check and n and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"pack_bits: codes must lie in [0, 2^{bits}) for {bits} bits, got "
                         f"[{int(codes.min())}, {int(codes.max())}]")
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    stream = ((codes.reshape(-1, 1).to(torch.int32) >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32)).to(torch.uint8)
    return (stream.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(data: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 stream → int32 [n] codes."""
    _check_bits("unpack_bits", bits)
    check_int("n", n, "unpack_bits", minimum=0)
    if not isinstance(data, Tensor) or data.dtype != torch.uint8 or data.numel() < packed_nbytes(n, bits):
        raise ValueError(f"unpack_bits: data must be a uint8 stream of at least {packed_nbytes(n, bits)} bytes "
                         f"for {n} codes of {bits} bits")
    shifts = torch.arange(8, device=data.device, dtype=torch.int32)
    stream = ((data.reshape(-1, 1).to(torch.int32) >> shifts) & 1).reshape(-1)[: n * bits]
    weights = 1 << torch.arange(bits, device=data.device, dtype=torch.int32)
    return (stream.view(n, bits) * weights).sum(dim=1, dtype=torch.int32)
