"""Asymmetric calibration and coefficient tuning in the layer loop (bpdq/engine/quality.py), through
quantize_model on tiny random Llamas, in memory and from a model directory."""

from __future__ import annotations

import importlib

import pytest
import torch

import bpdq
from bpdq.calibration import calibration_windows
from bpdq.linear import QuantLinear
from bpdq.engine.passes import collect_hessians
from bpdq.engine.quality import AsymmetricCalibration, asymmetric_hessians
from bpdq.solvers.hessian import HessianAccumulator
from tests.engine.test_loop import checkpoint_files
from tests.tiny_models import TINY_CALIBRATION, tiny_model, tiny_model_dir, tiny_tokenizer

RECIPE_2BIT = {"group_size": 32, "grid": {"type": "bitplane", "planes": 2}, "solver": "gptq"}
CALIBRATION = {**TINY_CALIBRATION, "samples": 16}


def held_out() -> torch.Tensor:
    return torch.stack(calibration_windows(tiny_tokenizer(), {**TINY_CALIBRATION, "seed": 123}))


def output_error(seed: int, solver, **levers) -> float:
    """MSE of the final hidden states of the quantized tiny model vs its full-precision self, held-out text."""
    model, ids = tiny_model(layers=3, seed=seed), held_out()
    with torch.no_grad():
        reference = model.model(ids).last_hidden_state
    bpdq.quantize_model(model, tiny_tokenizer(), recipe={**RECIPE_2BIT, "solver": solver}, calibration=CALIBRATION,
                        device="cpu", progress=False, **levers)
    with torch.no_grad():
        return float((model.model(ids).last_hidden_state - reference).pow(2).mean())


@pytest.mark.parametrize("solver", [{"type": "gptq"}, {"type": "bpdq", "iters": 2}], ids=lambda s: s["type"])
def test_asymmetric_calibration_lowers_the_end_to_end_error_at_equal_bits(solver):
    # Lower on every seed, and by a clear margin on average (ratios here: 0.62-0.95 per seed, mean about 0.72);
    # a single tiny model's margin varies with the last bits of its Hessians, so the margin is asked of the mean.
    ratios = [output_error(seed, solver, asymmetric=True) / output_error(seed, solver) for seed in (0, 1, 2)]
    assert all(r < 1.0 for r in ratios), ratios
    assert sum(ratios) / len(ratios) < 0.85, ratios


def test_asymmetric_flag_comes_from_the_calibration_config_and_is_reported():
    model = tiny_model(layers=2)
    report = bpdq.quantize_model(model, tiny_tokenizer(), recipe=RECIPE_2BIT, progress=False, device="cpu",
                                 calibration={**TINY_CALIBRATION, "asymmetric": True})
    assert report.asymmetric == {"damp": 0.1} and report.tuning is None and report.allocation is None
    assert report.to_dict()["asymmetric"] == {"damp": 0.1}
    plain = bpdq.quantize_model(tiny_model(layers=2), tiny_tokenizer(), recipe=RECIPE_2BIT, progress=False,
                                device="cpu", calibration=TINY_CALIBRATION)
    assert plain.asymmetric is None
    with pytest.raises(TypeError, match="asymmetric must be True or False"):
        bpdq.quantize_model(tiny_model(layers=2), tiny_tokenizer(), recipe=RECIPE_2BIT, progress=False,
                            calibration=TINY_CALIBRATION, asymmetric="yes")


def test_equal_streams_give_the_symmetric_hessian_and_leave_the_weight_unchanged():
    from bpdq.engine.passes import batch_windows, capture_layer_inputs, run_layer

    model = tiny_model(layers=1)
    inputs = capture_layer_inputs(model, model.model.layers[0], batch_windows(calibration_windows(tiny_tokenizer(), TINY_CALIBRATION), 4))
    layer = model.model.layers[0]
    before = layer.self_attn.q_proj.weight.detach().clone()
    names = ["self_attn.q_proj", "self_attn.k_proj"]
    with torch.no_grad():
        hessians = asymmetric_hessians(layer, layer, names, inputs, inputs, torch.device("cpu"))
    acc = HessianAccumulator(64)
    for b in inputs:
        acc.add(layer.input_layernorm(b.hidden))
    assert torch.allclose(hessians["self_attn.q_proj"], acc.hessian, rtol=1e-5, atol=1e-6)
    assert hessians["self_attn.q_proj"] is hessians["self_attn.k_proj"]  # one accumulation for a shared input
    assert torch.equal(layer.self_attn.q_proj.weight, before)
    # with fp_out, the full-precision passes run to the end: the layer's outputs, as run_layer gives them
    fp_out: list = []
    with torch.no_grad():
        asymmetric_hessians(layer, layer, ["mlp.down_proj"], inputs, inputs, torch.device("cpu"), fp_out=fp_out)
        expected = run_layer(layer, inputs, torch.device("cpu"))
    assert len(fp_out) == len(expected) == len(inputs)
    assert all(torch.equal(a.hidden, b.hidden) and a.kwargs is b.kwargs for a, b in zip(fp_out, expected))


def test_the_asymmetric_damping_comes_from_the_calibration_config():
    """``calibration.asymmetric_damp`` damps the targets' solve: reported, in the resume fingerprint, and it
    changes the weights; out of [0, 10] it is refused before any work."""
    runs = {}
    for damp in (None, 0.5):
        model = tiny_model(layers=2)
        extra = {} if damp is None else {"asymmetric_damp": damp}
        report = bpdq.quantize_model(model, tiny_tokenizer(), recipe=RECIPE_2BIT, progress=False, device="cpu",
                                     calibration={**TINY_CALIBRATION, "asymmetric": True, **extra})
        runs[damp] = (report, model.model.layers[1].mlp.down_proj.planes.clone())
    assert runs[0.5][0].asymmetric == {"damp": 0.5} and runs[None][0].asymmetric["damp"] != 0.5
    assert not torch.equal(runs[0.5][1], runs[None][1])
    assert AsymmetricCalibration(damp=0.5).fingerprint() != AsymmetricCalibration().fingerprint()
    for bad in (-1, 11, float("nan")):
        with pytest.raises(ValueError, match="asymmetric_damp"):
            bpdq.quantize_model(tiny_model(layers=2), tiny_tokenizer(), recipe=RECIPE_2BIT, progress=False,
                                calibration={**TINY_CALIBRATION, "asymmetric_damp": bad})


@pytest.mark.parametrize("tuning", [None, {"steps": 2}], ids=["asymmetric", "asymmetric+tuning"])
def test_asymmetric_replays_finished_attention_in_both_streams_and_changes_no_byte(monkeypatch, tuning):
    from transformers.models.llama.modeling_llama import LlamaAttention

    from bpdq.engine.replay import Replay

    calls = []
    forward = LlamaAttention.forward
    monkeypatch.setattr(LlamaAttention, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))

    def run() -> tuple[dict[str, torch.Tensor], int]:
        calls.clear()
        model = tiny_model(layers=2)
        bpdq.quantize_model(model, tiny_tokenizer(), recipe=RECIPE_2BIT, calibration=CALIBRATION, device="cpu",
                            progress=False, asymmetric=True, tuning=tuning)
        return model.state_dict(), len(calls)

    replayed, n_replayed = run()
    monkeypatch.setattr(Replay, "finish", lambda self, name: None)  # nothing is ever replayed
    plain, n_plain = run()
    assert replayed.keys() == plain.keys()
    assert all(torch.equal(replayed[k], plain[k]) for k in plain)
    # per layer and batch, replay saves the attention of the down_proj pass in both streams (the
    # full-precision one also gives the fp outputs) and of the full-precision gate/up pass (the copy's o_proj
    # pass ran its attention to the end and recorded it); and, without tuning, of the quantized outputs' pass
    # (not run for the last layer, whose outputs nothing reads); and the tail (o_proj's kept input) gives the
    # quantized attention of the gate/up pass of every batch but the first (checked), in each of the 2 layers
    batches = -(-CALIBRATION["samples"] // 8)
    assert n_plain - n_replayed == batches * (6 if tuning else 7) + 2 * (batches - 1), (n_plain, n_replayed)


def test_tuning_lowers_each_layers_output_loss_and_leaves_finite_coefficients():
    model = tiny_model(layers=3)
    report = bpdq.quantize_model(model, tiny_tokenizer(), recipe=RECIPE_2BIT, calibration=TINY_CALIBRATION,
                                 device="cpu", progress=False, tuning={"steps": 6, "lr": 1e-3})
    assert [t["layer"] for t in report.tuning] == [f"model.layers.{i}" for i in range(3)]
    for t in report.tuning:
        assert t["loss_after"] < t["loss_before"] and t["steps"] == 6 and t["time_s"] >= 0
        assert len(t["modules"]) == 7
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 21 and all(torch.isfinite(q.coeffs).all() for q in quantized)
    assert report.asymmetric is None  # tuning carries the fp stream without turning asymmetric calibration on


def test_a_fully_skipped_layer_is_not_tuned_and_still_carries_the_streams():
    model = tiny_model(layers=3)
    report = bpdq.quantize_model(model, tiny_tokenizer(), recipe=RECIPE_2BIT, calibration=TINY_CALIBRATION, device="cpu",
                                 progress=False, tuning={"steps": 2}, asymmetric=True,
                                 rules=[{"match": r"model\.layers\.1\..*", "skip": True}])
    assert [t["layer"] for t in report.tuning] == ["model.layers.0", "model.layers.2"]
    assert not any(isinstance(m, QuantLinear) for m in model.model.layers[1].modules())


def test_lever_arguments_are_checked_before_any_work(tmp_path, monkeypatch):
    def no_capture(*args, **kwargs):
        raise AssertionError("no calibration pass may run")

    monkeypatch.setattr("bpdq.engine.loop.capture_layer_inputs", no_capture)
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="steps"):
        bpdq.quantize_model(tiny_model(), tok, recipe=RECIPE_2BIT, calibration=TINY_CALIBRATION, progress=False,
                            tuning={"steps": -1})
    with pytest.raises(TypeError, match="tuning must be"):
        bpdq.quantize_model(tiny_model(), tok, recipe=RECIPE_2BIT, calibration=TINY_CALIBRATION, progress=False, tuning=3)
    with pytest.raises(ValueError, match="need calibration data"):
        bpdq.quantize_model(tiny_model(), tok, recipe={**RECIPE_2BIT, "solver": "rtn"}, calibration=TINY_CALIBRATION,
                            progress=False, tuning={}, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("levers", [{"asymmetric": True}, {"tuning": {"steps": 3}}], ids=["asymmetric", "tuning"])
def test_a_model_directory_gives_the_in_memory_checkpoint_bytes(levers, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir(tmp_path / "src", "llama", layers=2)
    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(src)
    memory = bpdq.quantize_model(model, tok, recipe=RECIPE_2BIT, calibration=TINY_CALIBRATION, progress=False,
                                 device="cpu", output=tmp_path / "memory", **levers)
    lazy = bpdq.quantize_model(src, tok, recipe=RECIPE_2BIT, calibration=TINY_CALIBRATION, progress=False,
                               device="cpu", output=tmp_path / "lazy", **levers)
    assert checkpoint_files(tmp_path / "lazy") == checkpoint_files(tmp_path / "memory")
    assert (lazy.asymmetric, lazy.tuning is None) == (memory.asymmetric, memory.tuning is None)


def test_offloaded_streams_give_the_same_checkpoint(tmp_path, caplog):
    tok = tiny_tokenizer()
    levers = {"tuning": {"steps": 2}, "asymmetric": True}
    bpdq.quantize_model(tiny_model(layers=2), tok, recipe=RECIPE_2BIT, calibration=TINY_CALIBRATION, progress=False,
                        device="cpu", batch_size=2, output=tmp_path / "memory", **levers)
    # 4 batches of 16 KB; every stream shares the 40 KB budget: the captured inputs keep two batches in memory
    with caplog.at_level("INFO", logger="bpdq.engine.loop"):
        bpdq.quantize_model(tiny_model(layers=2), tok, recipe=RECIPE_2BIT, progress=False, device="cpu", batch_size=2,
                            calibration={**TINY_CALIBRATION, "offload": "40KB"}, output=tmp_path / "offloaded", **levers)
    assert "2 of 4 batches offloaded" in caplog.text
    assert checkpoint_files(tmp_path / "offloaded") == checkpoint_files(tmp_path / "memory")


class _Wide(torch.nn.Module):
    """A layer of three narrow linears on one wide input: ``a`` and ``b`` share it, ``c`` is projectable."""

    def __init__(self, n: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for name in "abc":
            linear = torch.nn.Linear(n, 8, bias=False)
            linear.weight.data = torch.randn(8, n, generator=gen) / n**0.5
            setattr(self, name, linear)

    def forward(self, x):
        return x + (self.a(x) + self.b(x) + self.c(x)).sum(-1, keepdim=True)


def _wide_streams(n: int, batches: int):
    from bpdq.batch import Batch

    gen = torch.Generator().manual_seed(1)
    fp = [Batch(torch.randn(1, 32, n, generator=gen), (), {}) for _ in range(batches)]
    q = [Batch(b.hidden + 0.05 * torch.randn(1, 32, n, generator=gen), (), {}) for b in fp]
    return q, fp


@pytest.mark.parametrize("names,project", [(["a", "b"], False), (["c"], True)], ids=["shared", "projected"])
def test_asymmetric_hessians_keep_at_most_two_float64_in_by_in_matrices_alive(names, project):
    """Accumulating ``H_q`` and the cross moment, handing ``H_q`` out, the correction and the factorisation:
    never more than two ``[in, in]`` float64 matrices' bytes alive (tensors of at least 1/16 of one counted)."""
    from tests.live_bytes import LiveBytes

    n = 1024
    layer = _Wide(n)
    inputs, fp_inputs = _wide_streams(n, 4)
    square = n * n * 8
    with torch.no_grad(), LiveBytes(square // 16) as live:
        hessians = asymmetric_hessians(layer, _Wide(n), names, inputs, fp_inputs, torch.device("cpu"),
                                       fp_out=[] if project else None, group=True)
    assert hessians[names[0]].shape == (n, n) and not torch.equal(layer.a.weight, _Wide(n).a.weight) or project
    assert live.peak <= 2 * square, f"{live.peak / square:.2f} [in, in] float64 matrices alive at the peak"
    with torch.no_grad(), LiveBytes(square // 16) as symmetric:  # the symmetric path's, for scale
        collect_hessians(layer, names, inputs, torch.device("cpu"), group=True)
    assert symmetric.peak <= 2 * square


def test_equal_streams_leave_every_weight_unchanged_at_width_and_over_many_batches():
    """The cross moment is summed as ``(x_fp - x_q) x_q^T``: exactly zero for equal streams at any width and
    batch count (a float32 running ``sum x_fp x_q^T`` minus ``H_q`` is rounding noise there), so the asymmetric
    Hessian and weights are the symmetric ones bit for bit."""
    n = 512
    layer = _Wide(n)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    inputs, _ = _wide_streams(n, 12)
    with torch.no_grad():
        hessians = asymmetric_hessians(layer, _Wide(n), ["a", "b"], inputs, inputs, torch.device("cpu"), group=True)
        symmetric = collect_hessians(layer, ["a", "b"], inputs, torch.device("cpu"), group=True)
    assert torch.equal(hessians["a"], symmetric["a"])
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def _default_calibration() -> dict:
    return {k: v for k, v in TINY_CALIBRATION.items() if k != "asymmetric"}  # the library's default: auto


def test_asymmetric_calibration_is_the_default_where_it_applies():
    assert bpdq.QuantizeConfig().calibration.asymmetric == "auto"
    cfg = {"quantize": RECIPE_2BIT, "calibration": _default_calibration(), "progress": False, "device": "cpu"}
    auto = bpdq.quantize(tiny_model(layers=2), cfg, tokenizer=tiny_tokenizer())
    assert auto.asymmetric == {"damp": 0.1} and auto.stages == ["fp_stream", "asymmetric"]
    on = tiny_model(layers=2)
    required = bpdq.quantize(on, {**cfg, "calibration": {**cfg["calibration"], "asymmetric": True}}, tokenizer=tiny_tokenizer())
    off = tiny_model(layers=2)
    plain = bpdq.quantize(off, {**cfg, "calibration": {**cfg["calibration"], "asymmetric": False}}, tokenizer=tiny_tokenizer())
    assert plain.asymmetric is None and plain.stages == []
    assert [r.proxy_loss for r in auto.modules] == [r.proxy_loss for r in required.modules]  # auto = true here
    q = lambda m: m.model.layers[0].mlp.down_proj.quantized_weight()  # noqa: E731
    assert not torch.equal(q(on).coeffs, q(off).coeffs)


def test_auto_leaves_asymmetric_calibration_out_where_it_cannot_apply(caplog):
    cfg = {"calibration": _default_calibration(), "progress": False, "device": "cpu"}
    with caplog.at_level("INFO", logger="bpdq.engine.builtin"):
        rtn = bpdq.quantize(tiny_model(layers=1), {**cfg, "quantize": {**RECIPE_2BIT, "solver": "rtn"}}, tokenizer=tiny_tokenizer())
    assert rtn.asymmetric is None and rtn.stages == [] and "off, no solver uses a Hessian" in caplog.text
    with pytest.raises(ValueError, match="need calibration data"):  # asked for explicitly: refused, as before
        bpdq.quantize(tiny_model(layers=1), {**cfg, "quantize": {**RECIPE_2BIT, "solver": "rtn"},
                                             "calibration": {**cfg["calibration"], "asymmetric": True}})
    moe = bpdq.quantize(tiny_model("qwen3_moe"), {**cfg, "quantize": RECIPE_2BIT}, tokenizer=tiny_tokenizer())
    assert moe.asymmetric is None and moe.stages == []
    importlib.import_module("bpdq.engine.guided")  # registers the stage
    guided = bpdq.quantize(tiny_model(layers=1), {**cfg, "quantize": RECIPE_2BIT, "stages": ["guided_hessian"]},
                           tokenizer=tiny_tokenizer())  # the named stage computes the Hessians: no conflict
    assert guided.stages == ["guided_hessian"]
