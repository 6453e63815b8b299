"""One explicit registry per extension axis (grids, solvers, kernels, model adapters, loop stages).

A registry maps a name to an implementation class. ``register(name)`` is a class decorator; a taken name
raises, and asking for an unknown name raises an error that lists the known ones. Nothing is discovered by
class-name conventions: an implementation exists once it is registered. Each registry imports the package
of its built-in implementations on first use (``builtins``), so ``import bpdq`` itself stays light.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """An unknown registry name. Subclasses both ``KeyError`` and ``ValueError``."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A name -> implementation table for one axis (e.g. ``"grid"``)."""

    def __init__(self, kind: str, builtins: str | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        #: Bumped by every (un)registration, so that caches of lookups (kernel dispatch) can tell.
        self.version = 0
        self._builtins = builtins

    def _load_builtins(self) -> None:
        """Import the package registering the built-in implementations (once, before any lookup)."""
        if self._builtins is not None:
            module, self._builtins = self._builtins, None
            importlib.import_module(module)

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: ``@GRIDS.register("mygrid")``. Raises ``ValueError`` if the name is taken."""
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(obj: T) -> T:
            self._load_builtins()
            if name in self._items:
                raise ValueError(
                    f"{self.kind} name {name!r} is already registered (by {self._items[name]!r}); "
                    f"choose another name or unregister it first"
                )
            self._items[name] = obj
            self.version += 1
            if isinstance(obj, type):
                obj.name = name  # type: ignore[attr-defined]
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        """Remove a registration (mainly for tests and interactive sessions)."""
        self.get(name)  # loads the built-ins
        del self._items[name]
        self.version += 1

    def get(self, name: str) -> T:
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {type(name).__name__}")
        self._load_builtins()
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(repr(n) for n in self.names()) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}") from None

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


GRIDS: Registry[Any] = Registry("grid", builtins="bpdq.grids")
SOLVERS: Registry[Any] = Registry("solver", builtins="bpdq.solvers")
KERNELS: Registry[Any] = Registry("kernel", builtins="bpdq.kernels")
ADAPTERS: Registry[Any] = Registry("adapter", builtins="bpdq.models")
#: User stages of the layer loop (:class:`bpdq.engine.stages.Stage` subclasses), named in a config's ``stages``.
STAGES: Registry[Any] = Registry("stage")
