"""Validating a raw config mapping with every problem reported at once.

Grid and solver blocks are checked against the registered implementation's own options model, so a grid or
solver registered from user code (imported before the config is read) works from a config file too. Each
problem is one ``path: value phrase`` line, e.g. ``quantize.grid.planes: 9 is not in 1..8``.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from bpdq.config.files import ConfigError, check_bounds
from bpdq.config.recipe import Recipe
from bpdq.registry import GRIDS, SOLVERS, Registry, UnknownNameError
from bpdq.validation import format_errors, format_path

#: Problems listed in one ``ConfigError`` (the rest are counted).
MAX_PROBLEMS = 20
M = TypeVar("M", bound=BaseModel)


def _check_plugin_spec(spec: Any, registry: Registry[Any], loc: tuple[str | int, ...]) -> list[str]:
    """Validate a grid/solver block against its registered implementation's own options model."""
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, dict) and "type" in spec:
        name, options = spec["type"], {k: v for k, v in spec.items() if k != "type"}
    else:
        return []  # shapes other than name / {"type": ...} are left to the recipe's own validation
    if not isinstance(name, str):
        return [f"{format_path(loc + ('type',))}: {name!r} is not a {registry.kind} name"]
    try:
        impl = registry.get(name)
    except UnknownNameError:
        known = ", ".join(registry.names())
        where = loc + ("type",) if isinstance(spec, dict) else loc
        return [f"{format_path(where)}: {name!r} is not a registered {registry.kind} (known: {known})"]
    try:
        impl.Options.model_validate(options)
    except ValidationError as e:
        return format_errors(e, impl.Options, options, prefix=loc)
    return []


def _check_plugins(data: dict[str, Any]) -> dict[str, list[str]]:
    """Problems per grid/solver block path (only blocks with problems)."""
    blocks: list[tuple[Any, tuple[str | int, ...]]] = []
    if isinstance(data.get("quantize"), dict):
        blocks.append((data["quantize"], ("quantize",)))
    if isinstance(data.get("rules"), list):
        blocks += [(r, ("rules", i)) for i, r in enumerate(data["rules"]) if isinstance(r, dict)]
    problems: dict[str, list[str]] = {}
    for block, loc in blocks:
        for key, registry in (("grid", GRIDS), ("solver", SOLVERS)):
            if block.get(key) is not None:
                found = _check_plugin_spec(block[key], registry, loc + (key,))
                if found:
                    problems[format_path(loc + (key,))] = found
    return problems


def _check_rule_recipes(config: Any) -> list[str]:
    """Each rule's overrides applied to the default recipe must make a valid recipe (cross-field rules)."""
    problems = []
    for i, rule in enumerate(config.rules):
        try:
            rule.apply(config.quantize)
        except ValidationError as e:
            problems += format_errors(e, Recipe, None, prefix=("rules", i))
    return problems


def validate(cls: type[M], data: dict[str, Any], source: str = "config") -> M:
    """``cls`` (a ``QuantizeConfig`` or a subclass) from a raw mapping; the problems found (the first
    ``MAX_PROBLEMS`` and a count of the rest) are listed in one :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping of its fields, got {type(data).__name__}")
    check_bounds(data, source)
    by_block = _check_plugins(data)
    problems = [p for found in by_block.values() for p in found]
    try:
        config = cls.model_validate(data)
    except ValidationError as e:
        # a block already reported precisely fails the recipe's own validation too: report it once
        problems += [p for p in format_errors(e, cls, data) if p.split(":")[0] not in by_block]
    else:
        problems += _check_rule_recipes(config)
    if problems:
        shown = problems[:MAX_PROBLEMS]
        if len(problems) > MAX_PROBLEMS:
            shown.append(f"... and {len(problems) - MAX_PROBLEMS} more problems")
        raise ConfigError(f"invalid {source}:\n" + "\n".join(f"  {p}" for p in shown), shown)
    return config
