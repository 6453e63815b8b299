"""Pydantic errors as 'path: value is not in lo..hi' lines (bpdq/validation.py)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bpdq.validation import format_errors, format_path


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    planes: int = Field(default=2, ge=1, le=8)
    ratio: float = Field(default=0.5, gt=0)
    mode: str = "a"


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: Inner = Field(default_factory=Inner)
    items: list[Inner] = Field(default_factory=list)
    name: str


def _lines(data):
    with pytest.raises(ValidationError) as info:
        Outer.model_validate(data)
    return format_errors(info.value, Outer, data)


def test_format_path_uses_dots_and_indices():
    assert format_path(("rules", 0, "grid", "planes")) == "rules[0].grid.planes"
    assert format_path(()) == ""


def test_range_errors_state_the_declared_bounds_through_nesting_and_lists():
    assert _lines({"name": "x", "inner": {"planes": 9}}) == ["inner.planes: 9 is not in 1..8"]
    assert _lines({"name": "x", "items": [{}, {"planes": 0}]}) == ["items[1].planes: 0 is not in 1..8"]


def test_one_sided_bounds_say_what_is_allowed():
    assert _lines({"name": "x", "inner": {"ratio": -1}}) == ["inner.ratio: -1 is not allowed: must be > 0"]


def test_unknown_keys_list_the_allowed_ones_and_missing_fields_are_required():
    assert _lines({"inner": {"plane": 2}}) == [
        "inner.plane: unknown key (allowed: planes, ratio, mode)",
        "name: is required",
    ]


def test_type_errors_name_the_expected_type():
    assert _lines({"name": "x", "inner": {"planes": "many"}}) == ["inner.planes: 'many' is not an integer"]
    assert _lines({"name": "x", "inner": 3}) == ["inner: 3 is not a mapping"]


def test_prefix_is_prepended():
    with pytest.raises(ValidationError) as info:
        Inner.model_validate({"planes": 10})
    assert format_errors(info.value, Inner, {}, prefix=("quantize", "grid")) == ["quantize.grid.planes: 10 is not in 1..8"]


def test_long_values_are_cut():
    lines = _lines({"name": "n", "inner": {"planes": "x" * 10_000}})
    assert len(lines) == 1 and lines[0].startswith("inner.planes: 'xxx") and len(lines[0]) < 140


class Pair(BaseModel):
    low: int = 0
    high: int = 1

    @model_validator(mode="after")
    def _ordered(self) -> "Pair":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self


def test_a_cross_field_error_quotes_the_rule_not_the_whole_block():
    with pytest.raises(ValidationError) as info:
        Pair(low=3, high=2)
    assert format_errors(info.value, Pair, None) == ["low (3) must be <= high (2)"]
    assert format_errors(info.value, Pair, None, prefix=("rules", 0)) == ["rules[0]: low (3) must be <= high (2)"]
