"""Small operations on ``nn.Module`` trees shared by the layers above."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn


@contextmanager
def replaced_forward(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """Inside it, ``module(...)`` calls ``forward`` instead of the class's ``forward`` (an instance attribute
    shadows it; the module's hooks still run)."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


@contextmanager
def swapped_module(root: nn.Module, name: str, module: nn.Module) -> Iterator[None]:
    """Inside it, the submodule ``name`` of ``root`` is ``module``; the original is put back on exit."""
    original = root.get_submodule(name)
    root.set_submodule(name, module)
    try:
        yield
    finally:
        root.set_submodule(name, original)


def on_device(module: nn.Module, device: torch.device) -> torch.device:
    """Move ``module`` to ``device``; returns where it was (its home)."""
    home = next(module.parameters()).device
    module.to(device)
    return home
