"""bpdq.quantize(model, config) and QuantizeConfig (bpdq/api.py, bpdq/config/run.py): the config as an object,
a dict or a file; the deprecated quantize_model as a thin wrapper (same bytes); user stages."""

from __future__ import annotations

import pytest
import torch

import bpdq
from bpdq.config import ConfigError, QuantizeConfig, as_config
from bpdq.engine.stages import check_stages
from tests.engine.test_loop import checkpoint_files
from tests.tiny_models import TINY_CALIBRATION, TINY_RECIPE, tiny_model, tiny_model_dir, tiny_tokenizer

GPTQ = {**TINY_RECIPE, "solver": "gptq"}


def test_a_config_object_a_dict_and_a_file_give_the_same_checkpoint(tmp_path):
    config = QuantizeConfig(quantize=GPTQ, calibration=TINY_CALIBRATION, device="cpu", progress=False)
    path = tmp_path / "run.yaml"
    config.save(path)
    for name, given in (("object", config), ("dict", config.to_dict()), ("file", path)):
        model = tiny_model(layers=2)
        bpdq.quantize(model, given, tokenizer=tiny_tokenizer())
        bpdq.save(model, tiny_tokenizer(), tmp_path / name)
    assert checkpoint_files(tmp_path / "object") == checkpoint_files(tmp_path / "dict") == checkpoint_files(tmp_path / "file")


def test_the_deprecated_quantize_model_warns_and_writes_the_same_bytes(tmp_path):
    src = tiny_model_dir(tmp_path / "src", "llama", layers=2)
    recipe = {**TINY_RECIPE, "solver": {"type": "bpdq", "iters": 2}}
    with pytest.warns(DeprecationWarning, match="quantize_model is deprecated"):
        bpdq.quantize_model(src, recipe=recipe, calibration={**TINY_CALIBRATION, "asymmetric": True}, progress=False,
                            device="cpu", output=tmp_path / "old", batch_size=4)
    config = {"quantize": recipe, "calibration": {**TINY_CALIBRATION, "asymmetric": True, "batch_size": 4},
              "device": "cpu", "progress": False, "output": str(tmp_path / "new")}
    report = bpdq.quantize(src, config)
    assert report.stages == ["fp_stream", "asymmetric"] and report.asymmetric is not None
    assert checkpoint_files(tmp_path / "old") == checkpoint_files(tmp_path / "new")


def test_a_strategy_file_can_be_the_config_and_its_model_is_not_part_of_it(tmp_path):
    path = tmp_path / "strategy.yaml"
    path.write_text("model: smollm2-135m\nquantize: {group_size: 32, solver: rtn}\noutput: somewhere\n")
    config = as_config(path)
    assert isinstance(config, QuantizeConfig) and config.quantize.group_size == 32 and config.output == "somewhere"
    with pytest.raises(ConfigError, match="model: unknown key"):
        QuantizeConfig.from_file(path)


def test_file_overrides_and_every_problem_named_at_once(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("quantize: {group_size: 32, grid: bitplane}\n")
    config = QuantizeConfig.from_file(path, ["calibration.samples=16", "quantize.grid.planes=3"])
    assert config.calibration.samples == 16 and config.quantize.grid["planes"] == 3
    with pytest.raises(ConfigError) as info:
        QuantizeConfig.from_dict({"device": "gpu", "calibration": {"batch_size": 0}, "resume": "sometimes",
                                  "max_shard_size": "lots"})
    problems = "\n".join(info.value.problems)
    for field in ("device: 'gpu' is not one of auto, cpu, cuda, cuda:N", "calibration.batch_size", "resume",
                  "max_shard_size"):
        assert field in problems
    with pytest.raises(TypeError, match="config must be a QuantizeConfig, a dict or a path"):
        bpdq.quantize(tiny_model(), 42)


def test_an_in_memory_model_of_another_dtype_than_the_config_is_refused():
    with pytest.raises(ValueError, match="it holds float32, the config asks for bfloat16"):
        bpdq.quantize(tiny_model(), {"dtype": "bfloat16", "quantize": TINY_RECIPE, "progress": False})


class Diagonal(bpdq.Stage):
    """Hessians from the inputs' second moments on the diagonal only: GPTQ then equals RTN."""

    name = "diagonal"
    provides_hessians = True

    def __init__(self):
        self.groups = []

    def hessians(self, step, names):
        self.groups.append(list(names))
        return {n: torch.eye(step.layer.get_submodule(n).in_features) for n in names}


def test_a_stage_that_computes_the_hessians_replaces_the_symmetric_ones():
    stage = Diagonal()
    model, original = tiny_model(layers=1), tiny_model(layers=1)
    recipe = {**GPTQ, "solver": {"type": "gptq", "order": "none", "refit": "none"}}
    bpdq.quantize(model, {"quantize": recipe, "calibration": TINY_CALIBRATION, "progress": False},
                  tokenizer=tiny_tokenizer(), stages=[stage])
    assert stage.groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                            ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    for name, module in model.model.layers[0].named_modules():
        if isinstance(module, bpdq.QuantLinear):
            weight = original.model.layers[0].get_submodule(name).weight
            expected = bpdq.quantize_weight(weight, torch.eye(weight.shape[1]), grid=recipe["grid"],
                                            solver=recipe["solver"], group_size=recipe["group_size"])
            assert torch.equal(module.planes, expected.planes) and torch.equal(module.coeffs, expected.coeffs), name


def test_stages_are_checked_before_any_work():
    class Other(Diagonal):
        name = "other"

    with pytest.raises(ValueError, match="named 'diagonal'"):
        check_stages([Diagonal(), Diagonal()])
    with pytest.raises(ValueError, match="'diagonal', 'other' all compute the Hessians"):
        check_stages([Diagonal(), Other()])
    with pytest.raises(ValueError, match="'asymmetric', 'diagonal' all compute the Hessians"):
        bpdq.quantize(tiny_model(), {"calibration": {"asymmetric": True}}, stages=[Diagonal()])
    with pytest.raises(TypeError, match="stages must be bpdq.Stage instances, got function"):
        bpdq.quantize(tiny_model(), {}, stages=[lambda step: None])


def test_a_registered_stage_is_named_in_the_config(register):
    class Counting(bpdq.Stage):
        def __init__(self, start=0):
            self.count = start

        def after_write(self, step):
            self.count += 1

        def finish(self, report):
            report.extra[self.name] = self.count

    register(bpdq.STAGES, "counting", Counting)
    report = bpdq.quantize(tiny_model(layers=2), {"quantize": TINY_RECIPE, "progress": False,
                                                  "stages": [{"type": "counting", "start": 10}]})
    assert report.stages == ["counting"] and report.extra == {"counting": 12}
    with pytest.raises(ValueError, match="unknown stage 'nope'; known stages: 'counting'"):
        QuantizeConfig(stages=["nope"])
    with pytest.raises(ValueError, match="stage 'counting' cannot be made with arguments {'steps': 3}"):
        bpdq.quantize(tiny_model(), {"quantize": TINY_RECIPE, "stages": [{"type": "counting", "steps": 3}]})
