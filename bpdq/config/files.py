"""Reading config files (YAML or JSON) and applying ``--set a.b.c=value`` overrides to the raw mapping.

Configs are bounded before anything else looks at them: a file above :data:`MAX_CONFIG_BYTES`, a mapping
nested deeper than :data:`MAX_DEPTH` or holding more than :data:`MAX_NODES` values once YAML aliases are
expanded (an "alias bomb" is a few hundred bytes) is a ``ConfigError``, never a ``RecursionError`` or
megabytes of error text.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import yaml

from bpdq.validation import format_path

class ConfigError(ValueError):
    """A bad config file, config mapping or override. ``problems`` holds one ``path: message`` line per
    problem (formatted by :mod:`bpdq.validation`)."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems) or [message]


#: Bounds on a strategy config: file size, nesting depth, and values counted with aliases expanded.
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 20_000


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loader that also reads ``1e-4`` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML (a superset of JSON) with the float fix above."""
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML/JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply (a config nests at most {MAX_DEPTH} levels)") from None
    check_bounds(data, source)
    return data


def check_bounds(data: Any, source: str = "the config") -> None:
    """Raise ``ConfigError`` if ``data`` nests deeper than ``MAX_DEPTH`` or holds more than ``MAX_NODES``
    values counting every use of a shared (aliased) value. Iterative: no recursion, stops at the bound."""
    stack = [(data, 0)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise ConfigError(
                f"{source}: too large: more than {MAX_NODES} values once YAML aliases are expanded"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(f"{source}: nested too deeply (a config nests at most {MAX_DEPTH} levels)")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)


def read_config(path: str | Path) -> dict[str, Any]:
    """The raw mapping in a YAML or JSON strategy file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"strategy config {str(path)!r} does not exist or is not a file")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"strategy config {str(path)!r} has {size} bytes; a config has at most {MAX_CONFIG_BYTES}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read strategy config {str(path)!r}: {e}") from None
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a strategy config must be a mapping with keys such as model, calibration, quantize, "
            f"rules, output, device; got {type(data).__name__}"
        )
    return data


def _split_path(dotted: str) -> list[str | int]:
    parts: list[str | int] = []
    for token in re.split(r"\.|(?=\[)", dotted):
        if token.startswith("[") and token.endswith("]") and token[1:-1].isdigit():
            parts.append(int(token[1:-1]))
        elif token.isdigit():
            parts.append(int(token))
        elif token and "[" not in token and "]" not in token:
            parts.append(token)
        else:
            raise ConfigError(f"--set: bad field path {dotted!r} (use dotted names like quantize.group_size)")
    return parts


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as a YAML scalar or flow value."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"--set expects FIELD=VALUE (e.g. quantize.group_size=128), got {assignment!r}")
    keys = _split_path(path.strip())
    value = parse_yaml(raw, f"--set {path}") if raw.strip() else ""
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        where = format_path(keys[:i]) or "the config"
        if isinstance(key, int):
            if not isinstance(node, list) or not -len(node) <= key < len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ConfigError(f"--set {path}: {where} has no item [{key}] (it has {size} items)")
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {path}: {where} is {node!r}, not a mapping with a {key!r} key")
        if last:
            node[key] = value
            return
        if isinstance(node, dict) and not isinstance(node.get(key), (dict, list)):
            node[key] = _as_block(path, keys[: i + 1], node.get(key))
        node = node[key]


def _as_block(path: str, keys: list[str | int], value: Any) -> dict[str, Any]:
    """What a missing or scalar intermediate becomes when an override reaches below it: nothing becomes
    ``{}``, and ``grid: bitplane`` becomes ``{"type": "bitplane"}`` so ``--set quantize.grid.planes=3``
    works on a name-only block."""
    if value is None:
        return {}
    if keys[-1] in ("grid", "solver") and isinstance(value, str):
        return {"type": value}
    raise ConfigError(f"--set {path}: {format_path(keys)} is {value!r}, not a mapping")
