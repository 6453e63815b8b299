"""The strategy config: which model, which calibration text, which recipe per module, where to write.

A ``Strategy`` is read from YAML or JSON (``load_strategy``), may be edited with dotted overrides
(``--set quantize.group_size=128``), and round-trips back to YAML/JSON. Every problem is reported as a
``StrategyError`` (a ``ValueError``) whose message names the field path, the value given and what is
allowed, e.g. ``quantize.grid.planes: 9 is not in 1..8``.

Grid and solver blocks are checked against the registered implementation's own options model, so a grid or
solver registered from user code (imported before the config is read) works from a config file too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from bpdq.allocation import bpw_range
from bpdq.config import CalibrationConfig, Recipe, Rule
from bpdq.registry import GRIDS, SOLVERS, Registry, UnknownNameError
from bpdq.strategy.errors import StrategyError, format_errors, format_path
from bpdq.strategy.io import apply_override, check_bounds, read_config
from bpdq.tuning import TuningOptions

FORMAT_VERSION = 1
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class Strategy(BaseModel):
    """One quantization run: model, calibration, default recipe, per-module rules, output, device."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = Field(default=FORMAT_VERSION, description="format version of this config")
    model: str = Field(description="a local directory, a hub id (when online), or a built-in offline alias")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    quantize: Recipe = Field(default_factory=Recipe, description="the default recipe for every decoder linear")
    rules: list[Rule] = Field(default_factory=list, description="first match wins; regex on module names")
    tuning: TuningOptions | None = Field(
        default=None,
        description="coefficient tuning of each decoder layer against the full-precision layer's outputs "
        "(off when unset; {} tunes with the defaults); see [tuning](#tuning)",
    )
    target_bpw: float | None = Field(
        default=None,
        description="average bits per weight to meet by choosing 1..4 planes per module (at least 2 when the target "
        "allows every module 2) at quantize.group_size "
        "from each module's measured relative proxy loss (bitplane grid; k + 16(k+1)/g per weight; off when unset). Costs "
        "one extra calibration pass over the full-precision model and 4 GPTQ probe solves per linear",
    )
    output: str | None = Field(default=None, description="checkpoint directory (or --output)")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="dtype the model is loaded in (auto: as stored; a GGUF file loads as float32). bfloat16 "
        "makes calibration several times faster on CPUs with bf16 matrix units; unquantized tensors are saved "
        "in this dtype",
    )

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a model (a directory, a hub id, or a built-in alias)")
        return v

    @field_validator("target_bpw")
    @classmethod
    def _reachable_target(cls, v: float | None, info: ValidationInfo) -> float | None:
        recipe = info.data.get("quantize")
        if v is None or not isinstance(recipe, Recipe):
            return v
        if recipe.grid.get("type") != "bitplane":
            raise ValueError(f"needs the 'bitplane' grid (planes are chosen per module), quantize.grid is {recipe.grid.get('type')!r}")
        lo, hi = bpw_range(recipe.group_size)
        if not lo <= v <= hi:
            raise ValueError(
                f"is not reachable at quantize.group_size {recipe.group_size}: allowed {lo:g}..{hi:g} (1..4 planes, "
                "k + 16(k+1)/g bits per weight)"
            )
        return v

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not _DEVICE.fullmatch(v):
            raise ValueError("is not one of auto, cpu, cuda, cuda:N")
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        """Write as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
        path = Path(path)
        text = self.to_yaml() if path.suffix in (".yaml", ".yml") else self.to_json()
        path.write_text(text, encoding="utf-8")


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


def _check_rule_recipes(strategy: Strategy) -> list[str]:
    """Each rule's overrides applied to the default recipe must make a valid recipe (cross-field rules)."""
    problems = []
    for i, rule in enumerate(strategy.rules):
        try:
            rule.apply(strategy.quantize)
        except ValidationError as e:
            problems += format_errors(e, Recipe, None, prefix=("rules", i))
    return problems


#: Problems listed in one ``StrategyError`` (the rest are counted).
MAX_PROBLEMS = 20


def strategy_from_dict(data: dict[str, Any], source: str = "strategy config") -> Strategy:
    """Validate a raw mapping; the problems found (the first ``MAX_PROBLEMS`` and a count of the rest) are
    listed in one ``StrategyError``."""
    check_bounds(data, source)
    by_block = _check_plugins(data)
    problems = [p for found in by_block.values() for p in found]
    try:
        strategy = Strategy.model_validate(data)
    except ValidationError as e:
        # a block already reported precisely fails the recipe's own validation too: report it once
        problems += [p for p in format_errors(e, Strategy, data) if p.split(":")[0] not in by_block]
    else:
        problems += _check_rule_recipes(strategy)
    if problems:
        shown = problems[:MAX_PROBLEMS]
        if len(problems) > MAX_PROBLEMS:
            shown.append(f"... and {len(problems) - MAX_PROBLEMS} more problems")
        raise StrategyError(f"invalid {source}:\n" + "\n".join(f"  {p}" for p in shown), shown)
    return strategy


def load_strategy(path: str | Path, overrides: Iterable[str] = ()) -> Strategy:
    """Read, override (``a.b.c=value``) and validate a YAML/JSON strategy file."""
    data = read_config(path)
    for assignment in overrides:
        apply_override(data, assignment)
    return strategy_from_dict(data, f"strategy config {str(path)!r}")
