"""benchmarks/bench_scale.py: its stage meter sees every stage of a run, and every stage it reports has an
analytic budget (its real runs take hours: a broken script must not wait for them to surface)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


BENCH = _bench()


@pytest.mark.parametrize("recipe", ["gptq", "bpdq-asym", "bpdq-tune"])
def test_a_tiny_run_reports_every_stage_against_a_budget(recipe, tmp_path, monkeypatch):
    import bpdq.engine.loop as loop
    import bpdq.engine.quality as quality
    from bpdq.engine.sink import CheckpointSink

    for owner, attr in ((loop, "capture_layer_inputs"), (loop, "collect_hessians"), (quality.AsymmetricCalibration, "hessians"),
                        (loop, "quantize_linear"), (loop, "run_layer"), (quality, "run_layer"),
                        (quality.CoefficientTuning, "after_solve"), (CheckpointSink, "write_layer"),
                        (CheckpointSink, "finish")):
        monkeypatch.setattr(owner, attr, getattr(owner, attr))  # the run's wrappers are undone after the test
    shape = BENCH.Shape(64, 128, 4, 2, vocab=300)
    directory = BENCH.model_dir(tmp_path, "tiny", shape)
    result = BENCH.run_one(str(directory), recipe, str(tmp_path / "out"), 2, 16, None)
    names = [name for name, _, _ in result["stages"]]
    budget = BENCH.budgets(shape, recipe, 32, 32)
    expected = {"capture", "hessians q_proj+k_proj+v_proj", "hessians down_proj", "solve q_proj", "solve down_proj",
                "write", "finish", "run"}  # one layer and no head: no "outputs" pass
    if recipe == "bpdq-tune":
        expected |= {"tuning", "fp outputs"}
    assert expected <= set(names)
    assert set(names) - {"run"} <= set(budget), "a reported stage without a budget"
    assert all(peak >= result["base"] * 0.5 and seconds >= 0 for _, seconds, peak in result["stages"])
    table = BENCH.stage_table(result, budget)
    assert len(table) == 2 + len(set(names) - {"run"}) and (tmp_path / "out" / "model.safetensors").is_file()


def test_the_70b_budget_of_a_down_proj_solve_counts_its_hessian_and_factor():
    shape = BENCH.SHAPES["70b"]
    budget = BENCH.budgets(shape, "gptq", 2048, 2048)
    f = shape.intermediate
    assert budget["solve down_proj"] > 8 * f * f > budget["solve q_proj"]
    asym = BENCH.budgets(shape, "bpdq-asym", 2048, 2048)
    assert asym["hessians q_proj+k_proj+v_proj"] - budget["hessians q_proj+k_proj+v_proj"] > 8 * shape.hidden ** 2
