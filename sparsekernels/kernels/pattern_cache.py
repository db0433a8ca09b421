"""Values derived from a sparse pattern's index tensors, kept while those tensors are
unchanged: the GPU launch plan (``launch_plan``) and "this pattern was validated"
(``_checks``), so neither costs work or a device sync on every call.

An entry is reused only if every tensor it was derived from is the very same object
(weak references: a rebuilt pattern is a new object), still at the same version (an
in-place write bumps ``Tensor._version``), storage and shape. Inference tensors keep no
version counter: for them nothing is cached. Writes that bypass the version counter
(``t.data[...] = ...``, raw pointers, DLPack) are not seen: rebuild the pattern tensors
instead of editing them that way. A cached value must not hold its own key tensor (it
would never be freed). Values are built on the current stream; a pattern shared by
several CUDA streams needs the usual stream synchronisation before its first use.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TypeVar

from torch import Tensor

T = TypeVar("T")


def _stamp(tensors: tuple[Tensor, ...], extra: tuple) -> tuple | None:
    try:
        return tuple((t._version, t.data_ptr(), tuple(t.shape)) for t in tensors) + extra
    except RuntimeError:  # inference tensor: no version counter
        return None


class PatternCache:
    """``get(tensors, extra, compute)``: ``compute()``'s value for these tensors (and
    ``extra``, e.g. a column count), computed once while they stay unchanged."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple] = {}

    def get(self, tensors: tuple[Tensor, ...], extra: tuple, compute: Callable[[], T]) -> T:
        stamp = _stamp(tensors, extra)
        if stamp is None:
            return compute()
        key = id(tensors[0])
        hit = self._entries.get(key)
        if hit is not None and hit[1] == stamp and all(r() is t for r, t in zip(hit[0], tensors)):
            return hit[2]
        value = compute()
        refs = [weakref.ref(tensors[0], lambda _dead, key=key: self._entries.pop(key, None))]
        refs += [weakref.ref(t) for t in tensors[1:]]
        self._entries[key] = (refs, stamp, value)
        return value

    def __len__(self) -> int:
        return len(self._entries)
