"""Shared machinery for configurable plug-ins: pydantic options and building from name / dict / instance."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from bpdq.registry import Registry


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
            raise ValueError(describe_validation_error(err, self.Options, owner)) from None

    def to_config(self) -> dict[str, Any]:
        return {"type": self.name, **self.options.model_dump(mode="json")}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.model_dump().items())
        return f"{type(self).__name__}({opts})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.options == other.options  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.options.model_dump().items()))))


def describe_validation_error(err: ValidationError, model: type[BaseModel], owner: str) -> str:
    """One readable sentence per problem: the option, the value given, what went wrong and what is allowed.

    Each field's ``description`` (which states its allowed range) is quoted; unknown options list the
    known ones. The result is meant for a ``ValueError``.
    """
    fields = model.model_fields
    problems = []
    for e in err.errors():
        name = ".".join(str(part) for part in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown option {name!r}; allowed options: {', '.join(fields) or '(none)'}")
        elif name in fields:
            described = f" ({fields[name].description})" if fields[name].description else ""
            problems.append(f"{name}={e['input']!r}: {msg}{described}")
        else:
            problems.append(msg)
    return f"invalid options for {owner}: " + "; ".join(problems)


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
