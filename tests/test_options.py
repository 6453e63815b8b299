"""bpdq/options.py: validated plug-in options, readable errors, to_config and build(name | dict | instance)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from bpdq import GRIDS, BitPlaneGrid, UniformGrid
from bpdq.grids import Grid
from bpdq.options import Configurable, Options, build


class ToyOptions(Options):
    size: int = Field(default=3, ge=1, le=5, description="toy size, 1..5")
    label: str = "x"


class Toy(Configurable):
    Options = ToyOptions


def test_options_are_validated_and_frozen():
    toy = Toy(size=4)
    assert toy.options.size == 4 and toy.options.label == "x"
    with pytest.raises(ValueError):
        toy.options.size = 2


def test_out_of_range_option_names_field_value_and_allowed_range():
    with pytest.raises(ValueError, match=r"invalid options for Toy .*: size: 9 is not in 1\.\.5$"):
        Toy(size=9)


def test_unknown_option_lists_allowed_options():
    with pytest.raises(ValueError, match=r"sise: unknown key \(allowed: size, label\)"):
        Toy(sise=2)


def test_several_problems_are_all_reported():
    with pytest.raises(ValueError, match=r"size: 0 is not in 1\.\.5; colour: unknown key"):
        Toy(size=0, colour="red")


@pytest.mark.parametrize(
    ("cls", "options", "pattern"),
    [
        (BitPlaneGrid, {"planes": 9}, r"planes: 9 is not in 1\.\.8"),
        (BitPlaneGrid, {"planes": 0}, r"planes: 0 is not in 1\.\.8"),
        (BitPlaneGrid, {"planes": 5, "init_bits": 4}, r"\): init_bits \(4\) must be >= planes \(5\)$"),
        (UniformGrid, {"bits": 9}, r"bits: 9 is not in 1\.\.8"),
        (UniformGrid, {"bits": "two"}, r"bits: 'two' is not an integer"),
    ],
)
def test_builtin_grid_option_errors_are_readable(cls, options, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        cls(**options)
    assert f"'{cls.name}'" in str(info.value)
    assert "errors.pydantic.dev" not in str(info.value)


def test_to_config_round_trips_through_build():
    grid = BitPlaneGrid(planes=3, init_bits=6)
    config = grid.to_config()
    assert config == {"type": "bitplane", "planes": 3, "init_bits": 6}
    assert build(GRIDS, config, Grid, "grid") == grid
    assert build(GRIDS, dict(config), Grid, "grid") is not grid


def test_equality_and_hash_follow_type_and_options():
    assert UniformGrid(bits=3) == UniformGrid(bits=3)
    assert hash(UniformGrid(bits=3)) == hash(UniformGrid(bits=3))
    assert UniformGrid(bits=3) != UniformGrid(bits=2)
    assert BitPlaneGrid(planes=2) != UniformGrid(bits=2)
    assert repr(UniformGrid(bits=3)) == "UniformGrid(bits=3, symmetric=False)"


def test_build_from_name_dict_instance_and_pydantic_model():
    inst = UniformGrid(bits=2)
    assert build(GRIDS, inst, Grid, "grid") is inst
    assert build(GRIDS, "uniform", Grid, "grid") == UniformGrid()
    assert build(GRIDS, {"type": "uniform", "bits": 2}, Grid, "grid") == inst

    class Spec(BaseModel):
        type: str = "bitplane"
        planes: int = 3

    assert build(GRIDS, Spec(), Grid, "grid") == BitPlaneGrid(planes=3)


def test_build_dict_without_type_names_argument_and_known_names():
    pattern = r"grid: a dict spec needs a 'type' key .*'bitplane'.*'uniform'.*got keys \['bits'\]"
    with pytest.raises(ValueError, match=pattern):
        build(GRIDS, {"bits": 2}, Grid, "grid")


def test_build_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="unknown grid 'nf4'; known grids: .*'bitplane'.*'uniform'"):
        build(GRIDS, "nf4", Grid, "grid")


def test_build_wrong_type_raises_type_error():
    with pytest.raises(TypeError, match="grid must be a registered grid name .*got int"):
        build(GRIDS, 4, Grid, "grid")
