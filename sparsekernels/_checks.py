"""Small argument checks shared by every layer of the package (imported from anywhere,
importing nothing of it), so one mistake is worded the same way wherever it is made."""
from __future__ import annotations


def check_int(name: str, value: object, owner: str = "", *, minimum: int = 1,
              allow_none: bool = False) -> int | None:
    """``value`` if it is an int (not a bool) >= ``minimum``, else a ValueError naming
    ``owner`` (the public function or class, when given) and ``name``: "a positive int"
    for minimum 1, "a non-negative int" for 0, "an int >= m" otherwise. None passes
    through where ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{owner + ': ' if owner else ''}{name} must be {what}, got {value!r}")
    return value
