"""Shared machinery for configurable plug-ins: pydantic options and building from name / dict / instance."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from bpdq.registry import Registry
from bpdq.validation import format_errors


class Options(BaseModel):
    """Base of every plug-in's options model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)


class Configurable:
    """A plug-in whose constructor takes keyword options validated by ``cls.Options``.

    ``name`` is set by the registry decorator. ``to_config()`` returns ``{"type": name, **options}``, which
    ``build`` turns back into an equal instance.
    """

    name: ClassVar[str] = "<unregistered>"
    Options: ClassVar[type[Options]] = Options

    def __init__(self, **options: Any) -> None:
        try:
            self.options = self.Options(**options)
        except ValidationError as err:
            owner = f"{type(self).__name__} ({self.name!r})"
            problems = format_errors(err, self.Options, options)
            raise ValueError(f"invalid options for {owner}: " + "; ".join(problems)) from None

    def to_config(self) -> dict[str, Any]:
        return {"type": self.name, **self.options.model_dump(mode="json")}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.model_dump().items())
        return f"{type(self).__name__}({opts})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.options == other.options  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.options.model_dump().items()))))


C = TypeVar("C", bound=Configurable)

Spec = Any  # str | dict | instance


def build(registry: Registry[Any], spec: Spec, base: type[C], argname: str) -> C:
    """Resolve a registered name, a ``{"type": name, **options}`` dict, or an instance of ``base``."""
    if isinstance(spec, base):
        return spec
    if isinstance(spec, str):
        return registry.get(spec)()
    if isinstance(spec, dict):
        if "type" not in spec:
            raise ValueError(
                f"{argname}: a dict spec needs a 'type' key naming a registered {registry.kind} "
                f"(one of {registry.names()}), got keys {sorted(spec)}"
            )
        options = {k: v for k, v in spec.items() if k != "type"}
        return registry.get(spec["type"])(**options)
    if isinstance(spec, BaseModel):
        return build(registry, spec.model_dump(), base, argname)
    raise TypeError(
        f"{argname} must be a registered {registry.kind} name (one of {registry.names()}), a dict with "
        f"'type', or a {base.__name__} instance; got {type(spec).__name__}"
    )
