"""Bytes on the wire per rank and step: QSGD and natural compression against fp32."""

from __future__ import annotations

import torch

from .._checks import check_int
from .natural import natural_encode
from .qsgd import BUCKET_SIZE, LEVELS, elias_gamma_bits, qsgd_encode


def wire_report(numel: int = 1 << 20, *, levels: int = LEVELS, bucket_size: int = BUCKET_SIZE,
                seed: int = 0) -> dict:
    """Compresses a Gaussian gradient of ``numel`` entries with each scheme and reports the
    payload sizes actually produced (bytes), the Elias-coded size of QSGD's levels, and the
    reduction against fp32 (``*_ratio``)."""
    check_int("numel", numel, "wire_report")
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(numel, generator=g)
    dense = 4 * numel
    q_payload, _, q = qsgd_encode(grad, levels, bucket_size, generator=g)
    nb = (numel + bucket_size - 1) // bucket_size
    elias_bytes = (32 * nb + elias_gamma_bits(q) + 7) // 8
    n_payload, _ = natural_encode(grad, generator=g)
    return {
        "numel": numel, "levels": levels, "bucket_size": bucket_size, "fp32_bytes": dense,
        "qsgd_bytes": int(q_payload.numel()), "qsgd_ratio": dense / q_payload.numel(),
        "qsgd_elias_bytes": elias_bytes, "qsgd_elias_ratio": dense / elias_bytes,
        "natural_bytes": int(n_payload.numel()), "natural_ratio": dense / n_payload.numel(),
    }
