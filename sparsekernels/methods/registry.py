"""Method names -> method classes, so trainers' callbacks and configs can name a method
(``"rigl"``) instead of importing its class. Later methods join with :func:`register_method`."""

from __future__ import annotations

from .acdc import ACDC
from .gap import GaP
from .gmp import GMP
from .rigl import RigL
from .set_method import SET
from .srste import SRSTE
from .static import Static

_METHODS: dict[str, type] = {}


def _check_method_class(owner: str, cls: type) -> None:
    missing = [a for a in ("state_dict", "load_state_dict") if not callable(getattr(cls, a, None))]
    if missing:
        raise TypeError(f"{owner}: {cls.__qualname__} is not a sparse-training method class (it lacks "
                        f"{', '.join(missing)})")


def register_method(cls: type, name: str | None = None) -> type:
    """Makes ``cls`` reachable as ``get_method(name)`` (default: ``cls.name``, lower-cased).

    Returns ``cls``, so it also works as a class decorator. Registering another class under
    a taken name is an error; registering the same class again is a no-op.
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_method: cls must be a class, got {type(cls).__name__}")
    _check_method_class("register_method", cls)
    key = name if name is not None else getattr(cls, "name", None)
    if not isinstance(key, str) or not key:
        raise ValueError(f"register_method: name must be a non-empty string (or cls.name set), got {key!r}")
    key = key.lower()
    held = _METHODS.get(key)
    if held is not None and held is not cls:
        raise ValueError(f"register_method: the name {key!r} is taken by {held.__module__}.{held.__qualname__}")
    _METHODS[key] = cls
    return cls


def available_methods() -> tuple[str, ...]:
    """The registered method names, sorted."""
    return tuple(sorted(_METHODS))


def get_method(name_or_class: str | type) -> type:
    """The method class for a registered name (case-insensitive) or a method class itself.

    A class passes through unchecked beyond being a class with the method constructor
    ``cls(model, optimizer, **kwargs)`` and ``state_dict`` / ``load_state_dict``.
    """
    if isinstance(name_or_class, type):
        _check_method_class("get_method", name_or_class)
        return name_or_class
    if not isinstance(name_or_class, str):
        raise TypeError(f"get_method: expected a method name or class, got {type(name_or_class).__name__}")
    cls = _METHODS.get(name_or_class.lower())
    if cls is None:
        raise ValueError(f"get_method: unknown method {name_or_class!r}; known: {', '.join(available_methods())}")
    return cls


for _cls in (RigL, SET, GMP, Static, SRSTE, ACDC, GaP):
    register_method(_cls)
del _cls
