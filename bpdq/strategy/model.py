"""The CLI's strategy config: a :class:`~bpdq.config.QuantizeConfig` plus the ``model:`` to quantize.

A ``Strategy`` is read from YAML or JSON (``load_strategy``), may be edited with dotted overrides
(``--set quantize.group_size=128``), and round-trips back to YAML/JSON. Every problem is reported as a
``StrategyError`` (a ``ValueError``) whose message names the field path, the value given and what is
allowed, e.g. ``quantize.grid.planes: 9 is not in 1..8``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from pydantic import Field, ValidationInfo, field_validator

from bpdq.allocation import bpw_range
from bpdq.config import QuantizeConfig, Recipe


class Strategy(QuantizeConfig):
    """One quantization run from the command line: the model and its :class:`~bpdq.config.QuantizeConfig`."""

    model: str = Field(description="a local directory, a hub id (when online), or a built-in offline alias")

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

    def config(self) -> QuantizeConfig:
        """The run's configuration without the model."""
        return QuantizeConfig(**{name: getattr(self, name) for name in QuantizeConfig.model_fields})


def strategy_from_dict(data: dict[str, Any], source: str = "strategy config") -> Strategy:
    """Validate a raw mapping; the problems found are listed in one ``StrategyError``."""
    return Strategy.from_dict(data, source)


def load_strategy(path: str | Path, overrides: Iterable[str] = ()) -> Strategy:
    """Read, override (``a.b.c=value``) and validate a YAML/JSON strategy file."""
    return Strategy.from_file(path, overrides)
