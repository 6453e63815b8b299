"""Registering bpdq with transformers without importing transformers.

transformers loads bpdq checkpoints once :func:`bpdq.hf.register` has run, but importing transformers'
quantizer machinery costs seconds, which ``import bpdq`` (and ``bpdq --help``) should not pay. So
``import bpdq`` calls :func:`install`: if ``transformers.quantizers`` is already imported, bpdq registers now;
otherwise a meta-path finder wraps that module's loader and registers right after the module has been
executed, i.e. the first time anything (``from_pretrained`` included) imports it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any, Sequence

TARGET = "transformers.quantizers"


def install() -> None:
    """Register now if transformers' quantizers are loaded, else when they are (idempotent)."""
    module = sys.modules.get(TARGET)
    if module is not None and hasattr(module, "register_quantizer"):
        _register()
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def _register() -> None:
    from bpdq import hf

    try:
        hf.register()
    except ValueError as exc:  # another package owns "bpdq": never break transformers' own import over it
        warnings.warn(str(exc), stacklevel=2)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """The real loader of ``transformers.quantizers``, registering bpdq once the module is executed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> Any:  # resource readers and the like
        return getattr(self.inner, name)
