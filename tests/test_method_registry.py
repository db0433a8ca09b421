"""The method registry: names to classes for callbacks and configs."""

from __future__ import annotations

import pytest

from sparsekernels.methods import GMP, SET, SRSTE, RigL, Static, available_methods, get_method, register_method
from sparsekernels.methods import registry


def test_builtin_names_resolve_case_insensitively():
    for name, cls in (("rigl", RigL), ("SET", SET), ("gmp", GMP), ("Static", Static), ("srste", SRSTE)):
        assert get_method(name) is cls
    assert {"rigl", "set", "gmp", "static", "srste"} <= set(available_methods())


def test_a_class_passes_through_and_a_non_method_class_is_refused():
    assert get_method(RigL) is RigL
    with pytest.raises(TypeError, match="dict is not a sparse-training method class"):
        get_method(dict)
    with pytest.raises(TypeError, match="expected a method name or class, got int"):
        get_method(3)
    with pytest.raises(ValueError, match="unknown method 'rigel'; known: .*rigl"):
        get_method("rigel")


def test_register_method(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))

    class Mine(Static):
        name = "mine"

    assert register_method(Mine) is Mine and get_method("MINE") is Mine
    assert register_method(Mine) is Mine  # again: a no-op
    with pytest.raises(ValueError, match="the name 'rigl' is taken by .*RigL"):
        register_method(Mine, "rigl")
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        register_method(type("Anonymous", (Static,), {"name": ""}))
    with pytest.raises(TypeError, match="cls must be a class, got str"):
        register_method("mine")
    with pytest.raises(TypeError, match="list is not a sparse-training method class"):
        register_method(list, "plain")
