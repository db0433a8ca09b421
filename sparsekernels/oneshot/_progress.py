"""Progress bars (tqdm) for the pruners, imported only when shown: the package itself must
import where tqdm is absent (the GPU machine's Python has none)."""

from __future__ import annotations

from collections.abc import Iterable


def progress(iterable: Iterable, desc: str, enabled: bool, **kwargs) -> Iterable:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # no progress bar rather than no pruning
        return iterable
    return tqdm(iterable, desc=desc, **kwargs)
