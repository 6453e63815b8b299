"""Solver tests use tiny layers: run them single-threaded (thread start-up and oversubscription on a shared
machine cost more than the arithmetic), restoring the thread count afterwards."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
