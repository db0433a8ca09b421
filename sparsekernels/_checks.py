"""Small argument checks shared by every layer of the package (imported from anywhere,
importing nothing of it), so one mistake is worded the same way wherever it is made."""
from __future__ import annotations

import math
import numbers


def check_int(name: str, value: object, owner: str = "", *, minimum: int | None = 1,
              allow_none: bool = False) -> int | None:
    """``value`` if it is an int (not a bool) >= ``minimum`` (any int for None), else a
    ValueError naming ``owner`` (the public function or class, when given) and ``name``:
    "a positive int" for minimum 1, "a non-negative int" for 0, "an int >= m" otherwise,
    "or None" added where ``allow_none`` (None then passes through)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
            (minimum is not None and value < minimum):
        what = "an int" if minimum is None else \
            {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{owner + ': ' if owner else ''}{name} must be {what}{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return int(value)  # numpy's integers too


def check_positive_number(name: str, value: object, owner: str = "") -> float:
    """``value`` as a float if it is a finite int or float (not a bool) > 0, else a
    ValueError naming ``owner`` and ``name`` (a damping term, a step size)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner + ': ' if owner else ''}{name} must be a finite number > 0, got {value!r}")
    return float(value)
