"""Shared test configuration: the hypothesis profile and a fixture for temporary registrations."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# Fast and deterministic by default (CI); HYPOTHESIS_PROFILE=thorough for a longer local search.
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def _builtin_model_cache(tmp_path_factory):
    """Built-in models converted once per test session into a temporary cache (inherited by CLI subprocesses),
    not into the user's own; a ``BPDQ_CACHE`` already set is kept."""
    if "BPDQ_CACHE" in os.environ:
        yield
        return
    os.environ["BPDQ_CACHE"] = str(tmp_path_factory.mktemp("bpdq-cache"))
    yield
    os.environ.pop("BPDQ_CACHE", None)


@pytest.fixture
def register():
    """``register(registry, name, obj)``: register for the duration of one test, unregistered afterwards."""
    added = []

    def _register(registry, name, obj):
        registry.register(name)(obj)
        added.append((registry, name))
        return obj

    yield _register
    for registry, name in reversed(added):
        if name in registry:
            registry.unregister(name)
