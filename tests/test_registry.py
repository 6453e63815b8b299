"""bpdq/registry.py: register / get / names / unregister and the errors for taken and unknown names."""

from __future__ import annotations

import pytest

from bpdq import ADAPTERS, GRIDS, KERNELS, SOLVERS, Registry, UnknownNameError


def test_register_get_names_unregister():
    reg = Registry("widget")

    @reg.register("b")
    class B:
        pass

    @reg.register("a")
    class A:
        pass

    assert reg.get("a") is A and reg.get("b") is B
    assert A.name == "a" and B.name == "b"  # the decorator names the class
    assert reg.names() == ["a", "b"] and list(reg) == ["a", "b"]
    assert "a" in reg and "c" not in reg
    assert "widget" in repr(reg) and "'a'" in repr(reg)
    reg.unregister("a")
    assert reg.names() == ["b"]


def test_register_non_class_objects_keeps_them_unchanged():
    reg = Registry("thing")
    fn = reg.register("f")(len)
    assert fn is len and reg.get("f") is len


def test_taken_name_raises_value_error_naming_it():
    reg = Registry("widget")
    reg.register("x")(type("X", (), {}))
    with pytest.raises(ValueError, match="widget name 'x' is already registered"):
        reg.register("x")(type("Y", (), {}))
    assert reg.get("x").__name__ == "X"


def test_unknown_name_raises_key_and_value_error_listing_known_names():
    reg = Registry("widget")
    reg.register("alpha")(1)
    reg.register("beta")(2)
    with pytest.raises(UnknownNameError, match=r"unknown widget 'gamma'; known widgets: 'alpha', 'beta'"):
        reg.get("gamma")
    with pytest.raises(KeyError):
        reg.get("gamma")
    with pytest.raises(ValueError):
        reg.get("gamma")
    with pytest.raises(ValueError, match="known widgets: 'alpha', 'beta'"):
        reg.unregister("gamma")


def test_empty_registry_says_none_known():
    with pytest.raises(KeyError, match=r"known gadgets: \(none\)"):
        Registry("gadget").get("x")


@pytest.mark.parametrize("name", ["", "   ", 3, None])
def test_register_rejects_bad_names(name):
    with pytest.raises(TypeError, match="widget name must be a non-empty string"):
        Registry("widget").register(name)


def test_get_rejects_non_string():
    with pytest.raises(TypeError, match="grid name must be a string, got int"):
        GRIDS.get(3)


def test_builtin_registrations():
    assert {"uniform", "bitplane"} <= set(GRIDS.names())
    assert "rtn" in SOLVERS
    assert "torch" in KERNELS
    assert (GRIDS.kind, SOLVERS.kind, KERNELS.kind, ADAPTERS.kind) == ("grid", "solver", "kernel", "adapter")


def test_temporary_registration_in_a_global_registry(register):
    class Dummy:
        pass

    register(GRIDS, "test-dummy-grid", Dummy)
    assert GRIDS.get("test-dummy-grid") is Dummy
    with pytest.raises(ValueError, match="already registered"):
        GRIDS.register("test-dummy-grid")(Dummy)
