"""2:4 semi-structured format: in every group of 4 consecutive weights along the
reduction dimension (a row of W [out, in]) at most 2 are non-zero.

CPU layout: ``values [out, in/2]`` (the two kept weights of each group, in column order)
and ``meta [out, in/4]`` uint8 holding their positions in the group (i0 | i1 << 2, with
i0 < i1). Exact round trip with dense + mask. The GPU GEMM layouts (cuSPARSELt / CUTLASS)
are produced from this by the GPU backend.

Selection order of the magnitude prune (every backend: Python, C++, CUDA, Triton): a weight
ranks by ``|w|``; NaN ranks above every number, +-inf included, and all NaNs rank equal;
equal ranks go to the earlier position. This is the order of ``torch.sort`` / ``torch.topk``
(NaN first when descending), and it keeps a NaN weight, so the NaN shows in the output
instead of being dropped silently. The transposable prune scores a 4x4 pattern by the sum of
``|w|`` it keeps: a sum holding a NaN is NaN and beats every number; ties go to the first
pattern. Mask, values and meta always describe the same two positions per group.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..reference import meta_columns
from .masks import check_mask

# The 6 ways to keep 2 of 4: (i0, i1) with i0 < i1.
PAIRS = list(itertools.combinations(range(4), 2))


def check_24_shape(shape: tuple[int, int]) -> None:
    if len(shape) != 2:
        raise ValueError(f"2:4 sparsity needs a 2-D weight [out, in], got shape {tuple(shape)}")
    if shape[1] % 4:
        raise ValueError(f"2:4 sparsity needs in_features (the reduction dimension) divisible by 4, got weight "
                         f"shape {tuple(shape)}")


def check_24_dtype(op: str, weight: Tensor) -> None:
    """The magnitude prune and the compressed values are defined for floating weights only."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"{op}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{op}: weight must have a floating dtype, got {weight.dtype}")


def check_meta_bytes(owner: str, meta: Tensor, name: str = "meta") -> None:
    """Raises ValueError unless every byte of ``meta`` is i0 | i1 << 2 with 0 <= i0 < i1 < 4
    (the positions of a group's two kept values). O(numel); a device sync on a GPU."""
    if meta.numel():
        m = meta.to(torch.int32)
        if bool(((m >= 16) | (m < 0) | ((m & 3) >= (m >> 2))).any()):
            raise ValueError(f"{owner}: {name} entries must be i0 | i1 << 2 with 0 <= i0 < i1 < 4")


def _groups(t: Tensor) -> Tensor:
    """``t`` [out, in] as [out, in/4, 4]; explicit sizes, since -1 is ambiguous at 0 elements."""
    return t.reshape(t.shape[0], t.shape[1] // 4, 4)


def prune_24(weight: Tensor) -> Tensor:
    """Boolean 2:4 mask keeping the 2 largest |w| of every group of 4 along a row (the
    selection order of the module docstring: NaN highest, ties to the earlier position)."""
    check_24_dtype("prune_24", weight)
    check_24_shape(tuple(weight.shape))
    groups = _groups(weight.detach().abs())
    # Stable descending sort: equal magnitudes keep column order, so ties are deterministic;
    # torch sorts NaN above every number, which is the documented order.
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return mask.reshape(weight.shape)


def _transposable_patterns(device) -> Tensor:
    """The 90 4x4 0/1 patterns with exactly 2 ones in every row and every column."""
    rows = [torch.tensor([1.0 if j in p else 0.0 for j in range(4)]) for p in PAIRS]
    pats = [torch.stack(r) for r in itertools.product(rows, repeat=4)]
    pats = [p for p in pats if bool((p.sum(0) == 2).all())]
    return torch.stack(pats).to(device)  # [90, 4, 4]


def prune_24_transposable(weight: Tensor) -> Tensor:
    """Boolean mask that is 2:4 along rows AND columns in every aligned 4x4 tile, so W^T is
    2:4 too (needed for the input-gradient product of 2:4 training). Per tile, the pattern
    of the 90 valid ones keeping the largest sum of |w| (first one on ties; a sum holding a
    NaN beats every number, see the module docstring)."""
    check_24_dtype("prune_24_transposable", weight)
    if weight.dim() != 2:
        raise ValueError(f"prune_24_transposable: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if out_f % 4 or in_f % 4:
        raise ValueError(f"transposable 2:4 needs both dimensions divisible by 4, got {tuple(weight.shape)}")
    pats = _transposable_patterns(weight.device).to(torch.float64)               # [90, 4, 4]
    tiles = weight.detach().abs().double().reshape(out_f // 4, 4, in_f // 4, 4).transpose(1, 2)  # [R, C, 4, 4]

    def kept(t: Tensor) -> Tensor:  # per pattern, the sum of t over its kept positions
        return torch.einsum("rcij,pij->rcp", t, pats)

    # The einsum multiplies every entry by its 0/1 pattern weight, and NaN * 0 or inf * 0
    # is NaN: sum the finite entries alone, then let a kept inf make the score inf and a
    # kept NaN make it NaN -- the sums a kernel adding only the kept entries forms.
    finite = torch.isfinite(tiles)
    scores = kept(torch.where(finite, tiles, torch.zeros((), dtype=tiles.dtype, device=tiles.device)))
    scores = scores.masked_fill(kept(torch.isinf(tiles).double()) > 0, float("inf"))
    scores = scores.masked_fill(kept(torch.isnan(tiles).double()) > 0, float("nan"))
    best = scores.argmax(-1)                              # first max on ties; torch ranks NaN highest
    mask = pats[best].bool()                                                      # [R, C, 4, 4]
    return mask.transpose(1, 2).reshape(out_f, in_f)


def is_24(mask: Tensor, dim: int = 1) -> bool:
    """True when ``mask`` has at most 2 trues in every group of 4 along ``dim``."""
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise ValueError(f"is_24: mask must be a 2-D tensor, got "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    if isinstance(dim, bool) or dim not in (0, 1, -1, -2):
        raise ValueError(f"is_24: dim must be 0 or 1 (or -2 / -1), got {dim!r}")
    dim %= 2
    if mask.shape[dim] % 4:
        raise ValueError(f"is_24: mask's size along dim {dim} must be divisible by 4, got shape {tuple(mask.shape)}")
    m = mask.transpose(0, 1) if dim == 0 else mask
    return bool((_groups(m).sum(-1) <= 2).all())


@dataclass
class Sparse24:
    """A 2:4 ``[out, in]`` matrix: ``values [out, in/2]``, ``meta [out, in/4]`` (uint8)."""

    values: Tensor
    meta: Tensor
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor | None = None) -> "Sparse24":
        """Compresses ``weight`` keeping ``mask`` (default: :func:`prune_24`). A group with
        fewer than 2 kept weights stores explicit zeros at unused positions, so the round
        trip ``to_dense()`` is exactly ``weight * mask``."""
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError("Sparse24.from_dense: weight must be a 2-D tensor [out, in]")
        check_24_dtype("Sparse24.from_dense", weight)
        check_24_shape(tuple(weight.shape))
        if mask is None:
            mask = prune_24(weight)
        else:
            mask = check_mask("Sparse24.from_dense", mask, tuple(weight.shape)).to(weight.device)
        if not is_24(mask):
            raise ValueError("Sparse24.from_dense: mask is not 2:4 (more than 2 kept in a group of 4 along a row)")
        out_f, in_f = weight.shape
        g = _groups(mask)
        # Fill groups with fewer than 2 kept positions up to 2 with the first free ones
        # (stored as explicit zeros), so every group has exactly 2 slots.
        rank = torch.where(g, torch.zeros((), device=g.device), torch.ones((), device=g.device)) * 4 + \
            torch.arange(4, device=g.device)
        slots = torch.sort(rank, dim=-1).indices[..., :2].sort(-1).values          # [out, G, 2]
        # where, not weight * mask: a NaN outside the mask must not leak into a stored zero.
        w = _groups(torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)))
        values = torch.gather(w, -1, slots).reshape(out_f, in_f // 2)
        meta = (slots[..., 0] | (slots[..., 1] << 2)).to(torch.uint8)
        return cls(values.contiguous(), meta.contiguous(), (out_f, in_f))

    def columns(self) -> Tensor:
        """Column index (int64) of every stored value, [out, in/2]."""
        return meta_columns(self.meta)

    def to_dense(self) -> Tensor:
        dense = self.values.new_zeros(self.shape)
        return dense.scatter(1, self.columns(), self.values.detach())

    def mask(self) -> Tensor:
        """The stored positions (explicit zeros included)."""
        m = torch.zeros(self.shape, dtype=torch.bool, device=self.values.device)
        return m.scatter(1, self.columns(), True)


def compress_24(weight: Tensor, transposable: bool = False) -> tuple[Sparse24, Tensor]:
    """Prune ``weight`` to 2:4 by magnitude and compress it in one pass: ``(Sparse24, mask)``.

    Runs our compiled kernel (C++ on the CPU, CUDA C++ on a GPU) when built, else the
    Triton kernel (plain 2:4; also when the "triton" backend is forced, e.g. in the
    interpreter), and otherwise the Python
    definition (:func:`prune_24` / :func:`prune_24_transposable` + ``from_dense``), which
    every kernel matches exactly."""
    from .. import _extension, backends

    check_24_dtype("compress_24", weight)
    check_24_shape(tuple(weight.shape))
    w = weight.detach()
    requested = backends.get_backend()
    compiled = (w.device.type == "cpu" and _extension.compiled() and requested in ("auto", "cpu")) or (
        w.device.type == "cuda" and _extension.compiled_with_cuda() and requested in ("auto", "cuda"))
    if compiled:
        values, meta, mask = torch.ops.sparsekernels_C.sparse24_compress(w, transposable)
        return Sparse24(values, meta, tuple(w.shape)), mask
    triton_ok = "triton" in backends.available(w.device.type)
    if not transposable and triton_ok and (requested == "triton" or (requested == "auto" and w.device.type == "cuda")):
        from ..kernels.triton.sparse24 import sparse24_compress

        values, meta, mask = sparse24_compress(w)
        return Sparse24(values, meta, tuple(w.shape)), mask
    mask = prune_24_transposable(w) if transposable else prune_24(w)
    return Sparse24.from_dense(w, mask), mask
