"""Bit allocation in the run (bpdq/engine/allocate.py): a measuring pass, then planes per decoder linear
that meet target_bpw from below, in memory and from a model directory; bad targets fail before any work."""

from __future__ import annotations

import pytest

import bpdq
from bpdq.quantized import bits_per_weight as planes_bpw
from bpdq.linear import QuantLinear
from tests.engine.test_loop import checkpoint_files
from tests.tiny_models import TINY_CALIBRATION, tiny_model, tiny_model_dir, tiny_tokenizer

RECIPE = {"group_size": 32, "grid": {"type": "bitplane", "planes": 2}, "solver": "gptq"}


@pytest.mark.parametrize("target", [2.2, 3.5, 5.0])
def test_allocation_meets_the_target_within_one_modules_step_and_never_exceeds_it(target):
    model = tiny_model(layers=2)
    report = bpdq.quantize_model(model, tiny_tokenizer(), recipe=RECIPE, calibration=TINY_CALIBRATION,
                                 device="cpu", progress=False, target_bpw=target)
    alloc = report.allocation
    planes = {n: m.k for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert planes == alloc["planes"] and len(planes) == 14
    total = sum(m.n_params for m in report.quantized)
    step = max(m.n_params for m in report.quantized) * (planes_bpw(4, 32) - planes_bpw(1, 32)) / total
    assert target - step <= report.avg_bpw_quantized <= target + 1e-9
    assert report.avg_bpw_quantized == pytest.approx(alloc["bpw"])
    assert {m.name: m.recipe["grid"]["planes"] for m in report.quantized} == planes


def test_the_measuring_pass_leaves_the_model_as_it_was_and_the_run_follows_it():
    model = tiny_model(layers=2)
    seen = []
    import bpdq.engine.allocate as allocate

    measure = allocate.measure

    def spy(source, s, inputs, device):
        losses = measure(source, s, inputs, device)
        seen.extend(losses)
        assert not any(isinstance(m, QuantLinear) for m in source.model.modules())
        return losses

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(allocate, "measure", spy)
        bpdq.quantize_model(model, tiny_tokenizer(), recipe=RECIPE, calibration=TINY_CALIBRATION, device="cpu",
                            progress=False, target_bpw=2.6)
    assert len(seen) == 14
    for m in seen:
        assert set(m.losses) == {1, 2, 3, 4} and all(v >= 0 for v in m.losses.values())
        assert m.losses[4] < m.losses[1]


@pytest.mark.parametrize("target, floor", [(3.3, 1), (3.6, 2)])
def test_no_module_gets_one_plane_when_the_target_leaves_every_module_two(target, floor):
    # g=32: 2 planes are 3.5 bpw; below it some modules must take 1 plane, at or above it none may
    model = tiny_model(layers=2)
    report = bpdq.quantize_model(model, tiny_tokenizer(), recipe=RECIPE, calibration=TINY_CALIBRATION,
                                 device="cpu", progress=False, target_bpw=target)
    planes = report.allocation["planes"].values()
    assert min(planes) == floor and max(planes) > 2
    assert report.avg_bpw_quantized <= target + 1e-9


def test_a_rescaling_that_keeps_the_models_function_keeps_the_allocation():
    """up_proj times 64 and down_proj divided by 64 compute the same MLP; the absolute proxy loss of up_proj
    grows 64^2 times (its Hessian is unchanged) while the relative loss does not: the planes must not move."""
    import torch

    allocations = []
    for scale in (1.0, 64.0):
        model = tiny_model(layers=2)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.up_proj.weight.mul_(scale)
                layer.mlp.down_proj.weight.div_(scale)
        report = bpdq.quantize_model(model, tiny_tokenizer(), recipe=RECIPE, calibration=TINY_CALIBRATION,
                                     device="cpu", progress=False, target_bpw=2.6)
        allocations.append(report.allocation["planes"])
    assert allocations[0] == allocations[1]
    assert len(set(allocations[0].values())) > 1  # a real allocation, not one plane count everywhere


def test_a_model_directory_gives_the_in_memory_checkpoint_bytes(tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir(tmp_path / "src", "llama", layers=2)
    tok = tiny_tokenizer()
    memory = bpdq.quantize_model(AutoModelForCausalLM.from_pretrained(src), tok, recipe=RECIPE, calibration=TINY_CALIBRATION,
                                 progress=False, device="cpu", output=tmp_path / "memory", target_bpw=2.6)
    lazy = bpdq.quantize_model(src, tok, recipe=RECIPE, calibration=TINY_CALIBRATION, progress=False, device="cpu",
                               output=tmp_path / "lazy", target_bpw=2.6)
    assert checkpoint_files(tmp_path / "lazy") == checkpoint_files(tmp_path / "memory")
    assert lazy.allocation == memory.allocation


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"target_bpw": 7.0}, "target_bpw 7.0 cannot be met at group_size 32: allowed 2..6.5"),
        ({"target_bpw": 1.0}, "allowed 2..6.5"),
        ({"target_bpw": "2.5"}, "target_bpw must be a finite number"),
        ({"target_bpw": 2.5, "recipe": {**RECIPE, "grid": {"type": "uniform", "bits": 2}}}, "needs every quantized decoder linear on the 'bitplane' grid"),
        ({"target_bpw": 2.5, "rules": [{"match": r".*\.down_proj", "group_size": 64}]}, "down_proj has grid 'bitplane' at group_size 64"),
        ({"target_bpw": 2.5, "rules": [{"match": ".*", "skip": True}]}, "nothing would be quantized"),
        ({"target_bpw": 2.5, "recipe": {**RECIPE, "solver": "rtn"}}, "need calibration data"),
    ],
)
def test_a_bad_target_fails_before_any_work(kwargs, error, tmp_path, monkeypatch):
    def no_capture(*args, **kw):
        raise AssertionError("no calibration pass may run")

    monkeypatch.setattr("bpdq.engine.loop.capture_layer_inputs", no_capture)
    kwargs = {"recipe": RECIPE, **kwargs}
    with pytest.raises(ValueError) as info:
        bpdq.quantize_model(tiny_model(), tiny_tokenizer(), calibration=TINY_CALIBRATION, progress=False, device="cpu",
                            output=tmp_path / "out", **kwargs)
    assert error in str(info.value)
    assert not (tmp_path / "out").exists()


def test_offloaded_activations_give_the_same_allocation_and_checkpoint(tmp_path):
    tok = tiny_tokenizer()
    runs = {}
    for name, offload in (("memory", None), ("offloaded", "20KB")):  # 4 batches of 16 KB: 3 on disk
        runs[name] = bpdq.quantize_model(tiny_model(layers=2), tok, recipe=RECIPE, progress=False, device="cpu",
                                         batch_size=2, calibration={**TINY_CALIBRATION, "offload": offload},
                                         output=tmp_path / name, target_bpw=2.6)
    assert runs["offloaded"].allocation == runs["memory"].allocation
    assert checkpoint_files(tmp_path / "offloaded") == checkpoint_files(tmp_path / "memory")
