"""benchmarks/bench_quality.py builds a valid strategy config for every row (its rows take hours: a config
error must not wait for the run to surface)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from bpdq.strategy.model import strategy_from_dict

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "benchmarks" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


BENCH = _bench()


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
@pytest.mark.parametrize("row", [r for r in BENCH.ROWS if r.peer is None], ids=lambda r: r.name)
def test_every_row_is_a_valid_strategy_with_the_rows_own_grid_and_solver(row, quick):
    data = BENCH.row_strategy(row, quick)
    strategy = strategy_from_dict(data, row.name)
    want = row.overrides["quantize"]
    # the row's grid and solver replace the base config's (another type has other options)
    assert data["quantize"]["grid"] == want["grid"]
    assert strategy.quantize.group_size == want["group_size"]
    assert strategy.calibration.asymmetric == row.overrides.get("calibration", {}).get("asymmetric", False)
    if not quick:
        assert data["quantize"]["solver"] == want["solver"]
    # a row's own rules (e.g. down_proj's group size) are kept, after the quick mode's skip rule
    own = [r["match"] for r in row.overrides.get("rules", [])]
    assert [r.match for r in strategy.rules][len(strategy.rules) - len(own):] == own


def test_tuning_overrides_reach_only_the_tuning_rows():
    rows = {r.name: r for r in BENCH.ROWS}
    tuned = BENCH.row_strategy(rows["bpdq-k2-g192-down64-asym-tuned"], False, {"steps": 48, "autocast": "bfloat16"})
    assert tuned["tuning"] == {**BENCH.TUNING, "steps": 48, "autocast": "bfloat16"}
    assert strategy_from_dict(tuned, "tuned").tuning.autocast == "bfloat16"
    assert "tuning" not in BENCH.row_strategy(rows["bpdq-k2-g192-down64-asym"], False, {"steps": 48})


def test_calibration_overrides_reach_every_row_and_keep_its_asymmetric_flag():
    rows = {r.name: r for r in BENCH.ROWS}
    for name, asym in (("bpdq-k2-g192-down64-asym", True), ("bpdq-k2", False)):
        data = BENCH.row_strategy(rows[name], False, None, {"autocast": "bfloat16"})
        assert data["calibration"]["autocast"] == "bfloat16" and data["calibration"]["asymmetric"] is asym
        assert strategy_from_dict(data, name).calibration.autocast == "bfloat16"
    assert "autocast" not in BENCH.row_strategy(rows["bpdq-k2"], False)["calibration"]
