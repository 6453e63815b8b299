"""How each linear is quantized: the per-module ``Recipe`` and the ``Rule`` s that pick or override it by
module name.

Grids and solvers are given as registered names, ``{"type": name, **options}`` dicts or instances (as in
:func:`bpdq.quantize_weight`); a recipe normalises them (defaults included) to complete dicts and validates
them by building them through the registries, so an unknown name or option is an error naming the field.
A recipe also checks its fields together: the solver must accept the grid (``Solver.check_grid``) and a
kernel named explicitly must serve every call of the layer (``Kernel.serves``).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bpdq.grids.base import Grid
from bpdq.kernels.base import check_kernel_name, get_kernel
from bpdq.quantized import check_group_size
from bpdq.solvers.base import Solver
from bpdq.solvers.build import build_grid, build_solver

DEFAULT_GRID: dict[str, Any] = {"type": "bitplane", "planes": 2}
DEFAULT_SOLVER: dict[str, Any] = {"type": "bpdq"}


class ConfigModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def normalize_spec(spec: Any, kind: str) -> dict[str, Any]:
    """A grid/solver spec (name, dict, instance) as a validated ``{"type": name, **options}`` dict."""
    builder, base = (build_grid, Grid) if kind == "grid" else (build_solver, Solver)
    if not isinstance(spec, (str, dict, base)):
        # a ValueError, so that pydantic reports it as a validation error of the field
        raise ValueError(f"{kind} must be a registered name, a dict with 'type', or a {base.__name__} instance")
    return builder(spec).to_config()


def check_combination(grid: dict[str, Any], solver: dict[str, Any], group_size: int, kernel: str) -> None:
    """The cross-field rules of a recipe, asked of the plug-ins themselves: the solver accepts the grid at
    this group size, and an explicitly named kernel serves every call of such a layer."""
    g = build_grid(dict(grid))
    build_solver(dict(solver)).check_grid(g, group_size)
    if kernel != "auto":
        reason = get_kernel(kernel).serves(g.planes, group_size)
        if reason is not None:
            raise ValueError(f"kernel {kernel!r} cannot serve this recipe: {reason}")


class Recipe(ConfigModel):
    """How one linear layer is quantized."""

    group_size: int = Field(default=64, description="columns per group sharing coefficients (multiple of 8)")
    grid: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_GRID), validate_default=True)
    solver: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_SOLVER), validate_default=True)
    kernel: str = "auto"

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        return check_group_size(value)

    @field_validator("grid", mode="before")
    @classmethod
    def _grid(cls, value: Any) -> dict[str, Any]:
        return normalize_spec(value, "grid")

    @field_validator("solver", mode="before")
    @classmethod
    def _solver(cls, value: Any) -> dict[str, Any]:
        return normalize_spec(value, "solver")

    @field_validator("kernel")
    @classmethod
    def _kernel(cls, value: str) -> str:
        return check_kernel_name(value)

    @model_validator(mode="after")
    def _combination(self) -> "Recipe":
        check_combination(self.grid, self.solver, self.group_size, self.kernel)
        return self


class Rule(ConfigModel):
    """Per-module override: ``match`` is a regex matched with ``re.fullmatch`` against module names
    (e.g. ``model.layers.0.self_attn.q_proj``); ``skip`` leaves the module in full precision; other fields
    replace the recipe's (``None`` = inherit)."""

    match: str
    skip: bool = False
    group_size: int | None = None
    grid: dict[str, Any] | None = None
    solver: dict[str, Any] | None = None
    kernel: str | None = None

    @field_validator("match")
    @classmethod
    def _match(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"match is not a valid regular expression ({exc}): {value!r}") from None
        return value

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int | None) -> int | None:
        return None if value is None else check_group_size(value)

    @field_validator("grid", mode="before")
    @classmethod
    def _grid(cls, value: Any) -> dict[str, Any] | None:
        return None if value is None else normalize_spec(value, "grid")

    @field_validator("solver", mode="before")
    @classmethod
    def _solver(cls, value: Any) -> dict[str, Any] | None:
        return None if value is None else normalize_spec(value, "solver")

    @field_validator("kernel")
    @classmethod
    def _kernel(cls, value: str | None) -> str | None:
        return None if value is None else check_kernel_name(value)

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.match, name) is not None

    def apply(self, recipe: Recipe) -> Recipe | None:
        """The recipe with this rule's overrides, or ``None`` when the rule skips the module. The result is
        validated as a whole (e.g. a rule's ``grid: uniform`` under the recipe's ``solver: bpdq`` raises)."""
        if self.skip:
            return None
        overrides = {
            k: getattr(self, k) for k in ("group_size", "grid", "solver", "kernel") if getattr(self, k) is not None
        }
        return Recipe(**{**dict(recipe), **overrides}) if overrides else recipe


def as_recipe(recipe: Recipe | dict[str, Any]) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe(**recipe)
    raise TypeError(f"recipe must be a Recipe or a dict, got {type(recipe).__name__}")


def as_rules(rules: Iterable[Rule | dict[str, Any]]) -> tuple[Rule, ...]:
    if isinstance(rules, (str, dict, Rule)):
        raise TypeError("rules must be a list of Rule objects or dicts")
    out = []
    for rule in rules:
        if isinstance(rule, dict):
            rule = Rule(**rule)
        if not isinstance(rule, Rule):
            raise TypeError(f"each rule must be a Rule or a dict, got {type(rule).__name__}")
        out.append(rule)
    return tuple(out)


def resolve_recipe(name: str, recipe: Recipe, rules: Iterable[Rule] = ()) -> Recipe | None:
    """The recipe for module ``name``: the first matching rule applied to ``recipe`` (``None`` = skip)."""
    for rule in rules:
        if rule.matches(name):
            return rule.apply(recipe)
    return recipe
