"""Fixtures for the kernel tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton kernels on the CPU through the interpreter (read when a kernel is first built per mode)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
