"""Natural compression: stochastic rounding of every entry to a power of two.

Horváth, Ho, Horváth, Sahu, Canini & Richtárik, "Natural compression for distributed deep
learning", 2019 (arXiv:1905.10988). For x ≠ 0 with 2^e ≤ |x| < 2^(e+1),
C(x) = sign(x) · 2^e with probability (2^(e+1) − |x|) / 2^e, else sign(x) · 2^(e+1); C(0)=0.
Unbiased, with E(C(x) − x)² ≤ x²/8 (the paper's ω = 1/8).

For fp32 this is a rounding of the mantissa: the probability of rounding up is the
mantissa's fraction, so C keeps the sign bit and the 8-bit exponent (9 bits on the wire,
packed) and drops the 23 mantissa bits. Zero stays zero (exponent field 0); subnormals round
to 0 or 2^-126, also unbiased; inf passes through, and NaN arrives as an inf of its sign
(9 bits hold no mantissa to tell them apart; both say the step diverged).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .packing import pack_bits, packed_nbytes, unpack_bits

_MANTISSA = (1 << 23) - 1


def natural_compress(x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """``x`` (any shape, floating) → its 9-bit codes int32 [n]: sign << 8 | exponent field."""
    bits = x.detach().reshape(-1).float().contiguous().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & _MANTISSA
    u = torch.randint(0, 1 << 23, bits.shape, generator=generator, device=bits.device, dtype=torch.int32)
    special = exponent == 0xFF                         # inf / NaN: unchanged
    up = (u < mantissa) & ~special
    exponent = exponent + up.to(torch.int32)
    sign = (bits < 0).to(torch.int32)
    return (sign << 8) | exponent


def natural_decode(codes: Tensor) -> Tensor:
    """9-bit codes [n] → fp32 [n] (±2^(exponent−127), 0 for exponent 0)."""
    sign = (codes >> 8) & 1
    exponent = codes & 0xFF
    bits = (sign << 31) | (exponent << 23)
    return bits.to(torch.int32).view(torch.float32)


def natural_round(x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """C(x), same shape as ``x``, fp32."""
    return natural_decode(natural_compress(x, generator=generator)).view(x.shape)


def natural_encode(x: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``x`` → (uint8 payload of packed 9-bit codes, the decoded C(x) fp32 [n])."""
    codes = natural_compress(x, generator=generator)
    return pack_bits(codes, 9, check=False), natural_decode(codes)


def natural_payload_decode(payload: Tensor, n: int) -> Tensor:
    return natural_decode(unpack_bits(payload, 9, n))


def natural_payload_nbytes(n: int) -> int:
    return packed_nbytes(n, 9)
