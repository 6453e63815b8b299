"""The Strategy model: the issue's example, defaults, round trips, plug-in grids, error messages
(bpdq/strategy/model.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field

from bpdq import GRIDS, UniformGrid, build_grid
from bpdq.config import resolve_recipe
from bpdq.grids import UniformOptions
from bpdq.config.validate import MAX_PROBLEMS
from bpdq.strategy import FORMAT_VERSION, StrategyError, load_strategy, parse_yaml, strategy_from_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RTN = {"grid": {"type": "bitplane", "planes": 2}, "solver": {"type": "rtn"}}


def _problems(data):
    with pytest.raises(StrategyError) as info:
        strategy_from_dict(data)
    return info.value.problems


def test_the_issue_example_loads_as_written():
    s = load_strategy(CONFIGS / "smollm2-bpdq-2bit.yaml")
    assert s.version == FORMAT_VERSION and s.model == "smollm2-135m" and s.device == "auto"
    assert s.output == "runs/smollm2-bpdq-2bit"
    assert (s.calibration.samples, s.calibration.seq_len, s.calibration.seed) == (128, 512, 0)
    assert s.quantize.group_size == 64 and s.quantize.grid["planes"] == 2
    assert s.quantize.solver["type"] == "bpdq" and s.quantize.solver["alpha"] == pytest.approx(1e-4)
    down = resolve_recipe("model.layers.3.mlp.down_proj", s.quantize, s.rules)
    assert down is not None and down.grid["planes"] == 3 and down.group_size == 64
    assert resolve_recipe("model.layers.0.mlp.down_proj", s.quantize, s.rules).grid["planes"] == 3  # first match wins
    assert resolve_recipe("model.layers.0.self_attn.q_proj", s.quantize, s.rules) is None
    assert resolve_recipe("model.layers.10.self_attn.q_proj", s.quantize, s.rules) == s.quantize


def test_every_shipped_config_is_valid():
    configs = sorted(CONFIGS.glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        assert load_strategy(path).model


def test_every_shipped_config_opens_with_a_comment_of_at_most_3_lines():
    for path in sorted(CONFIGS.glob("*.yaml")):
        lines = path.read_text(encoding="utf-8").splitlines()
        comment = [line for line in lines if line.lstrip().startswith("#")]
        assert comment and lines[0].startswith("#"), f"{path.name} does not open with a comment saying what it runs"
        assert len(comment) <= 3, f"{path.name} has {len(comment)} comment lines, at most 3 allowed"


# SmolLM2-135M's decoder linears per layer (out, in): q, k, v, o, gate, up, down
SMOLLM2_LINEARS = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
                   "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
                   "mlp.down_proj": (576, 1536)}


@pytest.mark.parametrize("name, bpw", [("smollm2-bpdq-k2-2.28bpw.yaml", 2.28125), ("smollm2-bpdq-k2-2.375bpw.yaml", 2.375),
                                       ("smollm2-bpdq-k2-2.375bpw-fast.yaml", 2.375), ("smollm2-bpdq-k2.yaml", 2.75)])
def test_budget_configs_spend_the_bits_their_names_say(name, bpw):
    from bpdq.quantized import bits_per_weight

    s = load_strategy(CONFIGS / name)
    total = bits = 0.0
    for module, (out, inp) in SMOLLM2_LINEARS.items():
        recipe = resolve_recipe(f"model.layers.7.{module}", s.quantize, s.rules)
        assert inp % recipe.group_size == 0, f"{name}: {module} g={recipe.group_size} does not divide {inp}"
        total += out * inp
        bits += out * inp * bits_per_weight(recipe.grid["planes"], recipe.group_size)
    assert bits / total == pytest.approx(bpw)


def test_alpha_written_1e_minus_4_is_a_number(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model: m\nquantize:\n  grid: bitplane\n  solver: {type: gptq, damp: 1e-2}\n")
    assert load_strategy(path).quantize.solver["damp"] == pytest.approx(0.01)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_through_files(tmp_path, suffix):
    s = strategy_from_dict(
        {"model": "m", "quantize": {"group_size": 32, **RTN}, "rules": [{"match": ".*k_proj", "skip": True}],
         "calibration": {"samples": 7}, "output": "out", "device": "cuda:1"}
    )
    s.save(tmp_path / f"s{suffix}")
    again = load_strategy(tmp_path / f"s{suffix}")
    assert again == s
    assert strategy_from_dict(parse_yaml(s.to_yaml())) == strategy_from_dict(parse_yaml(s.to_json())) == s


def test_overrides_apply_before_validation(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model: m\nquantize: {grid: bitplane, solver: rtn}\n")
    s = load_strategy(path, ["quantize.group_size=128", "quantize.grid.planes=3", "device=cpu"])
    assert (s.quantize.group_size, s.quantize.grid["planes"], s.device) == (128, 3, "cpu")
    with pytest.raises(StrategyError, match=r"quantize\.group_size: 100 is not allowed: .*multiple of 8"):
        load_strategy(path, ["quantize.group_size=100"])


def test_errors_name_field_value_and_allowed_values():
    problems = _problems(
        {"model": "m", "quantize": {"grid": {"type": "bitplane", "planes": 9}, "solver": {"type": "rtn", "refits": -1}},
         "rules": [{"match": "x", "grid": {"type": "uniform", "bitz": 3}}, {"match": "("}],
         "calibration": {"samples": 0}, "device": "gpu", "outptu": "x"}
    )
    assert "quantize.grid.planes: 9 is not in 1..8" in problems
    assert "quantize.solver.refits: -1 is not in 0..100" in problems
    assert "rules[0].grid.bitz: unknown key (allowed: bits, symmetric)" in problems
    assert any(p.startswith("rules[1].match: '(' ") and "regular expression" in p for p in problems)
    assert "calibration.samples: 0 is not in 1..100000" in problems
    assert "device: 'gpu' is not one of auto, cpu, cuda, cuda:N" in problems
    assert any(p.startswith("outptu: unknown key (allowed: version, ") and " model" in p for p in problems)
    assert len(problems) == 7  # each problem reported once


def test_unknown_grid_or_solver_names_list_the_registered_ones():
    problems = _problems({"model": "m", "quantize": {"grid": "hexagonal", "solver": {"type": "nope"}}})
    assert problems[0].startswith("quantize.grid: 'hexagonal' is not a registered grid (known: ")
    assert "bitplane" in problems[0] and "uniform" in problems[0]
    assert problems[1].startswith("quantize.solver.type: 'nope' is not a registered solver (known: ")


def test_missing_model_and_wrong_version():
    assert _problems({"version": 2, **{"quantize": RTN}}) == ["version: 2 is not one of 1", "model: is required"]


def test_a_grid_registered_from_user_code_is_usable_with_its_own_options(register):
    class CoarseOptions(UniformOptions):
        coarseness: int = Field(default=1, ge=1, le=4)

    class Coarse(UniformGrid):
        Options = CoarseOptions

    register(GRIDS, "coarse-test", Coarse)

    s = strategy_from_dict({"model": "m", "quantize": {"grid": {"type": "coarse-test", "coarseness": 3}, "solver": "rtn"}})
    assert build_grid(s.quantize.grid) == Coarse(coarseness=3)
    assert _problems({"model": "m", "quantize": {"grid": {"type": "coarse-test", "coarseness": 5}, "solver": "rtn"}}) == [
        "quantize.grid.coarseness: 5 is not in 1..4"
    ]


def test_dtype_defaults_to_auto_and_names_the_allowed_values():
    assert strategy_from_dict({"model": "m"}).dtype == "auto"
    assert strategy_from_dict({"model": "m", "dtype": "bfloat16"}).dtype == "bfloat16"
    (problem,) = _problems({"model": "m", "dtype": "fp8"})
    assert problem.startswith("dtype: 'fp8' ") and "bfloat16" in problem and "float32" in problem


def test_target_bpw_is_checked_against_the_group_size_before_any_work():
    s = strategy_from_dict({"model": "m", "quantize": {"grid": "bitplane", "group_size": 64}, "target_bpw": 2.75})
    assert s.target_bpw == 2.75 and strategy_from_dict(parse_yaml(s.to_yaml())).target_bpw == 2.75
    assert strategy_from_dict({"model": "m"}).target_bpw is None
    low = _problems({"model": "m", "quantize": {"group_size": 64}, "target_bpw": 1.4})
    assert low == ["target_bpw: 1.4 is not reachable at quantize.group_size 64: allowed 1.5..5.25 (1..4 planes, "
                   "k + 16(k+1)/g bits per weight)"]
    high = _problems({"model": "m", "quantize": {"group_size": 128}, "target_bpw": 4.7})
    assert high[0].startswith("target_bpw: 4.7 is not reachable at quantize.group_size 128: allowed 1.25..4.625")
    uniform = _problems(
        {"model": "m", "quantize": {"grid": {"type": "uniform", "bits": 2}, "solver": "gptq"}, "target_bpw": 2.5}
    )
    assert uniform == ["target_bpw: 2.5 is not allowed: needs the 'bitplane' grid (planes are chosen per module), "
                       "quantize.grid is 'uniform'"]


def test_many_problems_are_capped_with_a_count():
    problems = _problems({"model": "m", **{f"unknown{i}": i for i in range(5000)}})
    assert len(problems) == MAX_PROBLEMS + 1 and problems[-1] == f"... and {5000 - MAX_PROBLEMS} more problems"


def test_cross_field_rules_of_the_recipe_and_of_every_rule_are_config_errors():
    assert _problems({"model": "m", "quantize": {"grid": "uniform", "solver": "bpdq"}}) == [
        "quantize: solver 'bpdq' works on the 'bitplane' grid only, got grid 'uniform'; use solver 'gptq' for a "
        "uniform grid"
    ]
    problems = _problems({"model": "m", "rules": [{"match": ".*", "grid": "uniform"}, {"match": "x", "kernel": "triton_lut"}]})
    assert problems[0].startswith("rules[0]: solver 'bpdq' works on the 'bitplane' grid only")
    assert problems[1].startswith("rules[1]: kernel 'triton_lut' cannot serve this recipe: it takes at most 8 tokens")
