"""``--plugin MODULE``: import user code (which registers grids, solvers, ...) before a config is read."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from bpdq.cli.errors import UsageError


def import_plugin(spec: str) -> None:
    """Import a module by dotted name (the current directory is searched too) or a ``.py`` file path."""
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"--plugin {spec}: no such file")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise UsageError(f"--plugin {spec}: cannot load this file as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        _run(spec, lambda: module_spec.loader.exec_module(module))  # type: ignore[union-attr]
        return
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(spec)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise UsageError(
            f"--plugin {spec}: no module named {spec!r} (give an importable module name on PYTHONPATH or in "
            f"the current directory, or a path to a .py file)"
        )
    _run(spec, lambda: importlib.import_module(spec))


def _run(spec: str, load) -> None:  # noqa: ANN001
    try:
        load()
    except Exception as exc:  # a plugin that fails to import is bad input: report it, don't crash
        raise UsageError(f"--plugin {spec}: importing it failed: {type(exc).__name__}: {exc}") from exc
