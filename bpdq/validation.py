"""Readable validation errors, the one formatter for every pydantic model of bpdq (strategy configs, recipes
and plug-in options): pydantic's errors as ``path: value is not in 1..8`` lines."""

from __future__ import annotations

import types
import typing
from typing import Any, Sequence

import annotated_types
from pydantic import BaseModel, ValidationError

Loc = Sequence["str | int"]


def format_path(loc: Loc) -> str:
    """``("rules", 0, "grid")`` -> ``rules[0].grid``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap(annotation: Any) -> Any:
    """The BaseModel inside ``Model | None`` / ``list[Model]``, else the annotation itself."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple):
        for arg in typing.get_args(annotation):
            inner = _unwrap(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return annotation


def _model_at(model: type[BaseModel] | None, loc: Loc) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (integer indices are skipped)."""
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        inner = _unwrap(model.model_fields[part].annotation)
        model = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None
    return model


def _bounds(model: type[BaseModel] | None, loc: Loc) -> list[tuple[str, Any]]:
    """The ``(operator, bound)`` constraints declared on the field at ``loc``, e.g. ``[(">=", 1), ("<=", 8)]``."""
    names = [p for p in loc if isinstance(p, str)]
    owner = _model_at(model, loc[:-1]) if names else None
    if owner is None or names[-1] not in owner.model_fields:
        return []
    found = []
    for meta in owner.model_fields[names[-1]].metadata:
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(meta, annotated_types.BaseMetadata) and getattr(meta, attr, None) is not None:
                found.append((op, getattr(meta, attr)))
    return found


def _range_phrase(bounds: list[tuple[str, Any]], ctx: dict[str, Any]) -> str:
    ops = dict(bounds)
    if set(ops) == {">=", "<="}:
        return f"is not in {ops['>=']}..{ops['<=']}"
    if not bounds:  # no declared bounds found: fall back to the one pydantic reports
        bounds = [(op, ctx[key]) for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if key in ctx]
    if not bounds:
        return "is out of range"
    return "is not allowed: must be " + " and ".join(f"{op} {value}" for op, value in bounds)


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "dict": "a mapping",
    "list": "a list",
    "model": "a mapping",
}


def _phrase(err: dict[str, Any], model: type[BaseModel] | None) -> str:
    kind, ctx, loc = err["type"], err.get("ctx") or {}, err["loc"]
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return _range_phrase(_bounds(model, loc), ctx)
    if kind == "missing":
        return "is required"
    if kind in ("enum", "literal_error"):
        return f"is not one of {ctx.get('expected', '?')}"
    if kind.endswith(("_parsing", "_type", "_from_float")):
        base = kind.split("_")[0]
        return f"is not {_TYPE_WORDS.get(base, base)}"
    if kind == "value_error":
        msg = str(err["msg"]).removeprefix("Value error, ")
        return msg if msg.startswith(("is ", "must ")) else f"is not allowed: {msg}"
    return f"is not allowed: {err['msg']}"


def _quote(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a bad value may be a whole block or a huge string)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...)"


def format_errors(
    error: ValidationError, model: type[BaseModel] | None, data: Any, prefix: Loc = ()
) -> list[str]:
    """One ``path: value phrase`` line per pydantic error (``data`` is what was validated)."""
    lines = []
    for err in error.errors(include_url=False):
        loc = tuple(err["loc"])
        path = format_path(tuple(prefix) + loc)
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            allowed = f" (allowed: {', '.join(owner.model_fields)})" if owner is not None else ""
            lines.append(f"{path}: unknown key{allowed}")
        elif err["type"] == "missing":
            lines.append(f"{path}: is required")
        elif err["type"] == "value_error" and isinstance(err["input"], dict):  # a cross-field rule of a block
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"{path}: {msg}" if path else msg)
        else:
            lines.append(f"{path}: {_quote(err['input'])} {_phrase(err, model)}")
    return lines
