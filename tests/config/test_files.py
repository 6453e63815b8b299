"""Reading strategy files and applying --set overrides (bpdq/strategy/io.py)."""

from __future__ import annotations

import pytest

from bpdq.strategy import StrategyError, apply_override, parse_yaml, read_config
from bpdq.config.files import MAX_CONFIG_BYTES, MAX_DEPTH, MAX_NODES


@pytest.mark.parametrize(
    "text, expected",
    [("1e-4", 1e-4), ("1.0e-4", 1e-4), ("-2E3", -2000.0), ("5e+2", 500.0), (".5e1", 5.0), ("12", 12), ("1e", "1e"),
     ("e5", "e5"), ("0.25", 0.25)],
)
def test_yaml_reads_exponent_floats_without_a_dot(text, expected):
    value = parse_yaml(f"x: {text}")["x"]
    assert value == expected and type(value) is type(expected)


def test_invalid_yaml_is_a_strategy_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(StrategyError, match="not valid YAML"):
        read_config(path)


def test_read_config_needs_an_existing_file_holding_a_mapping(tmp_path):
    with pytest.raises(StrategyError, match="does not exist"):
        read_config(tmp_path / "missing.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(StrategyError, match="must be a mapping.*got list"):
        read_config(tmp_path / "list.json")
    (tmp_path / "ok.json").write_text('{"model": "m", "quantize": {"group_size": 32}}')
    assert read_config(tmp_path / "ok.json") == {"model": "m", "quantize": {"group_size": 32}}


def test_override_sets_nested_values_parsed_as_yaml():
    data = {"model": "m", "quantize": {"group_size": 64}, "rules": [{"match": "a"}]}
    apply_override(data, "quantize.group_size=128")
    apply_override(data, "quantize.solver={type: bpdq, alpha: 1e-3}")
    apply_override(data, "rules.0.skip=true")
    apply_override(data, "rules[0].match=b.*")
    apply_override(data, "calibration.samples=16")
    assert data == {
        "model": "m",
        "quantize": {"group_size": 128, "solver": {"type": "bpdq", "alpha": 1e-3}},
        "rules": [{"match": "b.*", "skip": True}],
        "calibration": {"samples": 16},
    }


def test_override_below_a_named_grid_keeps_its_type():
    data = {"quantize": {"grid": "bitplane"}}
    apply_override(data, "quantize.grid.planes=3")
    assert data == {"quantize": {"grid": {"type": "bitplane", "planes": 3}}}


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("quantize.group_size", "expects FIELD=VALUE"),
        ("=3", "expects FIELD=VALUE"),
        ("rules.3.skip=true", r"rules has no item \[3\] \(it has 1 items\)"),
        ("model.name=x", "model is 'm', not a mapping"),
        ("quantize..x=1", "bad field path"),
        ("quantize.group_size=[1", "not valid YAML"),
    ],
)
def test_bad_overrides_name_the_problem(assignment, message):
    data = {"model": "m", "quantize": {"group_size": 64}, "rules": [{"match": "a"}]}
    with pytest.raises(StrategyError, match=message):
        apply_override(data, assignment)


def test_an_alias_bomb_is_refused_quickly_and_briefly(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"{'abcdefghij'[i]}: &{'abcdefghij'[i]} [{', '.join(['*' + 'abcdefghij'[i - 1]] * 10)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nmodel: m\n")  # ~600 bytes, 10^9 values expanded
    with pytest.raises(StrategyError) as info:
        read_config(path)
    assert f"more than {MAX_NODES} values once YAML aliases are expanded" in str(info.value)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "{a: " * 40 + "1" + "}" * 40])
def test_deep_nesting_is_a_config_error(tmp_path, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    with pytest.raises(StrategyError, match=f"nested too deeply \\(a config nests at most {MAX_DEPTH} levels\\)"):
        read_config(path)


def test_a_huge_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("model: m\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(StrategyError, match=f"has {path.stat().st_size} bytes; a config has at most {MAX_CONFIG_BYTES}"):
        read_config(path)
