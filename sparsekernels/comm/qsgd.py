"""QSGD quantisation of a gradient vector.

Alistarh, Grubic, Li, Tomioka & Vojnovic, "QSGD: communication-efficient SGD via gradient
quantization and encoding", NeurIPS 2017. Defaults as in the paper's experiments: s = 16
levels, buckets of 512 entries.

Each bucket v [d] (d = ``bucket_size``, the last may be shorter) is sent as its norm ‖v‖₂
(fp32) and, per entry, sign(vᵢ) · ξᵢ with ξᵢ ∈ {0, 1, ..., s}: for r = s·|vᵢ|/‖v‖₂ and
l = ⌊r⌋, ξᵢ = l + 1 with probability r − l, else l (unbiased stochastic rounding). Decoding
is ‖v‖₂ · sign · ξ / s, so E[Q(v)] = v and (Lemma 3.1)
E‖Q(v) − v‖² ≤ min(d/s², √d/s) · ‖v‖².

On the wire every entry takes 1 + ⌈log₂(s + 1)⌉ bits (sign, magnitude), packed; the
paper's Elias coding of the levels is what :func:`elias_gamma_bits` counts (the size an
entropy coder would send), reported next to the packed size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .packing import pack_bits, packed_nbytes, unpack_bits

LEVELS = 16
BUCKET_SIZE = 512


def check_qsgd_args(levels: object, bucket_size: object) -> None:
    for name, v in (("levels", levels), ("bucket_size", bucket_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"QSGD: {name} must be an int >= 1, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"QSGD: {name} must be >= 1, got {v}")
    if levels > 2**14:
        raise ValueError(f"QSGD: levels must be <= 16384 (15-bit magnitudes on the wire), got {levels}")


def magnitude_bits(levels: int) -> int:
    return max(1, math.ceil(math.log2(levels + 1)))


def _buckets(x: Tensor, bucket_size: int) -> Tensor:
    """x [n] fp32 zero-padded to [nb, bucket_size]."""
    n = x.numel()
    nb = max(1, math.ceil(n / bucket_size))
    out = x.new_zeros(nb * bucket_size)
    out[:n] = x
    return out.view(nb, bucket_size)


def qsgd_levels(x: Tensor, levels: int = LEVELS, bucket_size: int = BUCKET_SIZE, *,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Quantises ``x`` (any shape, floating) → (norms fp32 [nb], signed levels int32 [n] in
    [−s, s]). Zero buckets give level 0 everywhere."""
    check_qsgd_args(levels, bucket_size)
    flat = x.detach().reshape(-1).float()
    b = _buckets(flat, bucket_size)
    norms = torch.linalg.vector_norm(b, dim=1)
    r = b.abs() * (levels / torch.where(norms > 0, norms, 1)).unsqueeze(1)
    low = r.floor()
    u = torch.rand(r.shape, generator=generator, device=r.device, dtype=r.dtype)
    xi = (low + (u < r - low).to(r.dtype)).clamp_(max=levels)
    q = (xi * torch.sign(b)).to(torch.int32).reshape(-1)[: flat.numel()]
    return norms, q


def qsgd_decode(norms: Tensor, q: Tensor, levels: int, bucket_size: int) -> Tensor:
    """Signed levels [n] and norms [nb] → fp32 [n] (‖v‖ · q / s)."""
    check_qsgd_args(levels, bucket_size)
    n = q.numel()
    b = _buckets(q.float(), bucket_size)
    return (b * (norms / levels).unsqueeze(1)).reshape(-1)[:n]


def qsgd_encode(x: Tensor, levels: int = LEVELS, bucket_size: int = BUCKET_SIZE, *,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` → (the uint8 payload sent: norms' fp32 bytes then the packed codes; the norms
    fp32 [nb] and signed levels int32 [n] it holds, for error feedback / Elias counting)."""
    norms, q = qsgd_levels(x, levels, bucket_size, generator=generator)
    mb = magnitude_bits(levels)
    codes = q.abs() | ((q < 0).to(torch.int32) << mb)   # magnitude bits, then the sign bit
    payload = torch.cat([norms.contiguous().view(torch.uint8), pack_bits(codes, mb + 1, check=False)])
    return payload, norms, q


def qsgd_payload_decode(payload: Tensor, n: int, levels: int, bucket_size: int) -> Tensor:
    """Inverse of :func:`qsgd_encode`'s payload → fp32 [n]."""
    nb = max(1, math.ceil(n / bucket_size))
    norms = payload[: 4 * nb].contiguous().view(torch.float32)
    mb = magnitude_bits(levels)
    codes = unpack_bits(payload[4 * nb:], mb + 1, n)
    q = (codes & ((1 << mb) - 1)) * (1 - 2 * (codes >> mb))
    return qsgd_decode(norms, q, levels, bucket_size)


def qsgd_payload_nbytes(n: int, levels: int = LEVELS, bucket_size: int = BUCKET_SIZE) -> int:
    """Bytes one rank sends for ``n`` entries."""
    return 4 * max(1, math.ceil(n / bucket_size)) + packed_nbytes(n, magnitude_bits(levels) + 1)


def elias_gamma_bits(q: Tensor) -> int:
    """Bits of the levels under Elias-gamma coding of |ξ| + 1 plus a sign bit for non-zero
    levels: 2⌊log₂(|ξ|+1)⌋ + 1 (+1) bits per entry (small levels, the common case, cost
    1-4 bits instead of the fixed width)."""
    m = q.abs().to(torch.int64) + 1
    lengths = 2 * torch.floor(torch.log2(m.double())).to(torch.int64) + 1 + (q != 0).to(torch.int64)
    return int(lengths.sum())
