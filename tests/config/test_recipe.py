"""Recipe / Rule / CalibrationConfig validation and rule resolution."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bpdq.config import CalibrationConfig, Recipe, Rule, as_rules, resolve_recipe


def test_recipe_normalises_names_and_dicts_to_validated_specs():
    r = Recipe(grid="uniform", solver={"type": "rtn", "refits": "3"})
    assert r.grid == {"type": "uniform", "bits": 4, "symmetric": False}
    assert r.solver == {"type": "rtn", "refits": 3}  # numeric strings are accepted (pydantic's lax mode)


def test_default_recipe_records_every_option():
    from bpdq import build_grid, build_solver

    r = Recipe()
    assert r.solver == build_solver("bpdq").to_config() and {"iters", "alpha", "damp"} <= set(r.solver)
    assert r.grid == build_grid({"type": "bitplane", "planes": 2}).to_config() and "init_bits" in r.grid
    assert Recipe.model_validate(r.model_dump()) == r


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grid": "uniform", "solver": "bpdq"}, "bitplane"),
        ({"kernel": "triton_lut"}, "at most 8 tokens"),
        ({"kernel": "triton_gemm", "group_size": 16}, "group size 16"),
        ({"kernel": "triton_gemm", "grid": {"type": "bitplane", "planes": 5}}, "5 planes"),
    ],
)
def test_recipe_rejects_combinations_the_plugins_refuse(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        Recipe(**kwargs)


def test_recipe_accepts_combinations_the_plugins_serve():
    assert Recipe(grid="uniform", solver="gptq", kernel="triton_gemm").kernel == "triton_gemm"
    assert Recipe(kernel="torch", group_size=16).group_size == 16


def test_rule_overrides_are_validated_with_the_recipe():
    with pytest.raises(ValidationError, match="bitplane"):
        Rule(match=".*", grid="uniform").apply(Recipe())
    with pytest.raises(ValidationError, match="at most 8 tokens"):
        Rule(match=".*", kernel="triton_lut").apply(Recipe())


def test_recipe_accepts_instances():
    from bpdq import build_grid

    r = Recipe(grid=build_grid({"type": "bitplane", "planes": 3}), solver="rtn")
    assert r.grid["planes"] == 3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"grid": "nope"}, "grid"),
        ({"solver": {"type": "rtn", "bad": 1}}, "solver"),
        ({"grid": {"planes": 2}}, "grid"),
        ({"group_size": 60}, "group_size"),
        ({"group_size": 0}, "group_size"),
        ({"kernel": "fastest"}, "kernel"),
        ({"grid": 3}, "grid"),
        ({"groupsize": 64}, "groupsize"),
    ],
)
def test_recipe_errors_name_the_field(kwargs, field):
    with pytest.raises(ValidationError) as exc:
        Recipe(**kwargs)
    assert field in str(exc.value)


def test_recipe_round_trips_through_json():
    r = Recipe(group_size=32, grid={"type": "bitplane", "planes": 3}, solver="rtn")
    assert Recipe.model_validate_json(r.model_dump_json()) == r


def test_rule_validates_regex_and_overrides():
    with pytest.raises(ValidationError, match="regular expression"):
        Rule(match="(")
    with pytest.raises(ValidationError, match="group_size"):
        Rule(match=".*", group_size=12)
    base = Recipe(solver="rtn")
    rule = Rule(match=r".*down_proj", group_size=32, grid={"type": "bitplane", "planes": 3})
    out = rule.apply(base)
    assert out.group_size == 32 and out.grid["planes"] == 3 and out.solver == base.solver
    assert Rule(match=".*", skip=True).apply(base) is None
    assert Rule(match=".*").apply(base) == base


def test_resolve_recipe_first_match_wins_and_fullmatch():
    base = Recipe(solver="rtn")
    rules = as_rules([
        {"match": r"model\.layers\.0\..*", "skip": True},
        {"match": r".*proj", "group_size": 32},
        {"match": r".*q_proj", "group_size": 128},
    ])
    assert resolve_recipe("model.layers.0.self_attn.q_proj", base, rules) is None
    assert resolve_recipe("model.layers.1.self_attn.q_proj", base, rules).group_size == 32
    # fullmatch: "proj" alone does not match a longer name
    assert resolve_recipe("model.layers.1.self_attn.q_proj_extra", base, rules) == base
    assert resolve_recipe("lm_head", base, ()) == base


def test_as_rules_rejects_non_lists():
    with pytest.raises(TypeError):
        as_rules({"match": ".*"})
    with pytest.raises(TypeError):
        as_rules([3])


@pytest.mark.parametrize("kwargs", [{"samples": 0}, {"seq_len": 1}, {"seed": -1}, {"sample": 3}])
def test_calibration_config_validation(kwargs):
    with pytest.raises(ValidationError):
        CalibrationConfig(**kwargs)
