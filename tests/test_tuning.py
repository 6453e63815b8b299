"""bpdq/tuning.py: tuning lowers a quantized layer's output loss, keeps coefficients finite fp16, and
changes nothing without steps or learning rate."""

from __future__ import annotations

import pytest
import torch

from bpdq.engine.passes import batch_windows, capture_layer_inputs, run_layer
from bpdq.linear import QuantLinear
from bpdq.tuning import TuningOptions, tune_layer
from tests.tiny_models import tiny_model, tiny_tokenizer

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture()
def quantized_layer():
    """Layer 0 of a tiny Llama, its inputs, the full-precision outputs, and the layer with RTN 2-bit QuantLinears."""
    torch.manual_seed(0)
    model = tiny_model("llama", layers=1)
    ids = torch.randint(0, len(tiny_tokenizer()), (8, 24), generator=torch.Generator().manual_seed(1))
    layer = model.model.layers[0]
    with torch.no_grad():
        batches = capture_layer_inputs(model, layer, batch_windows(list(ids), 2))
        targets = [b.hidden for b in run_layer(layer, batches, torch.device("cpu"))]
    for name in LINEARS:
        parent, _, child = name.rpartition(".")
        lin = layer.get_submodule(name)
        q = QuantLinear.from_linear(lin, grid={"type": "bitplane", "planes": 2}, solver="rtn", group_size=32, kernel="torch")
        setattr(layer.get_submodule(parent), child, q)
    return layer, batches, targets


def _state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def test_tuning_lowers_the_layer_output_loss_and_keeps_fp16_finite_coefficients(quantized_layer):
    layer, batches, targets = quantized_layer
    flags = [p.requires_grad for p in layer.parameters()]
    res = tune_layer(layer, batches, targets, {"steps": 40, "lr": 2e-3, "windows_per_step": 2})
    assert res.loss_after < 0.9 * res.loss_before and res.steps == 40 and 0 < res.best_step <= 40
    assert sorted(res.modules) == sorted(LINEARS)
    for name in LINEARS:
        q = layer.get_submodule(name)
        assert isinstance(q, QuantLinear) and q.coeffs.dtype == torch.float16 and torch.isfinite(q.coeffs).all()
    # the reported loss is what the QuantLinears now compute (up to kernel rounding)
    with torch.no_grad():
        mse = sum(float((layer(b.hidden, *b.args, **b.kwargs) - t).pow(2).mean()) for b, t in zip(batches, targets)) / len(batches)
    assert mse == pytest.approx(res.loss_after, rel=1e-3)
    assert [p.requires_grad for p in layer.parameters()] == flags


def _batch_mses(layer, batches, targets):
    with torch.no_grad():
        return [float((layer(b.hidden, *b.args, **b.kwargs) - t).pow(2).mean()) for b, t in zip(batches, targets)]


def test_the_kept_state_is_chosen_on_eval_windows_batches(quantized_layer):
    layer, batches, targets = quantized_layer
    assert len(batches) == 4
    before = _batch_mses(layer, batches, targets)
    res = tune_layer(layer, batches, targets, {"steps": 6, "lr": 2e-3, "eval_windows": 2})
    after = _batch_mses(layer, batches, targets)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    chosen = [p for p in pairs if (before[p[0]] + before[p[1]]) / 2 == pytest.approx(res.loss_before, rel=1e-4)]
    assert len(chosen) == 1, (before, res.loss_before)  # two of the four batches, not all of them
    assert sum(before) / 4 != pytest.approx(res.loss_before, rel=1e-4)
    i, j = chosen[0]
    assert (after[i] + after[j]) / 2 == pytest.approx(res.loss_after, rel=1e-3)  # the same two after training
    assert res.loss_after <= res.loss_before


@pytest.mark.parametrize("options", [{"steps": 0}, {"steps": 5, "lr": 0.0}])
def test_no_steps_or_no_learning_rate_change_nothing(quantized_layer, options):
    layer, batches, targets = quantized_layer
    before = _state(layer)
    res = tune_layer(layer, batches, targets, {**options, "tune_norms": True})
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert res.loss_after == res.loss_before and res.best_step == 0


def test_tuning_norms_and_bf16_autocast(quantized_layer):
    layer, batches, targets = quantized_layer
    norm_before = layer.input_layernorm.weight.clone()
    res = tune_layer(layer, batches, targets, TuningOptions(steps=12, lr=2e-3, tune_norms=True, autocast="bfloat16"))
    assert res.loss_after <= res.loss_before
    assert layer.input_layernorm.weight.dtype == norm_before.dtype and torch.isfinite(layer.input_layernorm.weight).all()
    if res.best_step:
        assert not torch.equal(layer.input_layernorm.weight, norm_before)


def test_divergence_keeps_the_best_finite_state(quantized_layer):
    layer, batches, targets = quantized_layer
    res = tune_layer(layer, batches, targets, {"steps": 8, "lr": 1.0})  # far too large
    assert res.loss_after <= res.loss_before
    assert all(torch.isfinite(layer.get_submodule(n).coeffs).all() for n in LINEARS)


def test_bad_inputs_are_errors(quantized_layer):
    layer, batches, targets = quantized_layer
    with pytest.raises(ValueError, match="one target per batch"):
        tune_layer(layer, batches, targets[:-1])
    with pytest.raises(ValueError, match="target 0 has shape"):
        tune_layer(layer, batches, [t[:, :3] for t in targets])
    with pytest.raises(ValueError, match="stepz"):
        tune_layer(layer, batches, targets, {"stepz": 3})
    with pytest.raises(ValueError, match="no QuantLinear"):
        tune_layer(torch.nn.Sequential(torch.nn.Linear(4, 4)), batches, targets)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    from bpdq.devices import _cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\nbugs\t\t: spectre\n")
    assert _cpu_flags(str(info)) == {"fpu", "sse2", "avx2", "amx_bf16", "amx_tile"}
    assert _cpu_flags(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize(("flags", "want"), [({"avx2", "fma"}, "none"), ({"avx512f", "avx512_bf16"}, "bfloat16"), ({"amx_bf16"}, "bfloat16")])
def test_auto_autocast_uses_bfloat16_only_on_a_cpu_with_bf16_units(quantized_layer, monkeypatch, flags, want):
    import bpdq.devices

    monkeypatch.setattr(bpdq.devices, "_cpu_flags", lambda: frozenset(flags))
    layer, batches, targets = quantized_layer
    res = tune_layer(layer, batches, targets, {"steps": 2, "lr": 1e-3, "autocast": "auto"}, device="cpu")
    assert res.autocast == want and res.to_dict()["autocast"] == want
    assert tune_layer(layer, batches, targets, {"steps": 0, "autocast": "float16"}).autocast == "float16"


def test_unknown_autocast_names_the_allowed_values():
    with pytest.raises(ValueError, match="auto"):
        TuningOptions(autocast="fp8")


@pytest.mark.parametrize("windows", [1, 2])
def test_learned_planes_are_written_back_and_give_the_reported_loss(quantized_layer, windows):
    layer, batches, targets = quantized_layer
    before = {k: v.clone() for k, v in layer.state_dict().items() if k.endswith("planes")}
    res = tune_layer(layer, batches, targets, {"steps": 60, "lr": 2e-3, "windows_per_step": windows,
                                               "learn_planes": True, "planes_lr": 0.02})
    assert res.loss_after < 0.9 * res.loss_before and res.best_step > 0
    after = {k: v for k, v in layer.state_dict().items() if k.endswith("planes")}
    assert any(not torch.equal(after[k], before[k]) for k in before), "no plane choice moved"
    with torch.no_grad():
        mse = sum(float((layer(b.hidden, *b.args, **b.kwargs) - t).pow(2).mean()) for b, t in zip(batches, targets)) / len(batches)
    assert mse == pytest.approx(res.loss_after, rel=1e-3)


def test_learned_planes_without_steps_change_nothing_and_frozen_planes_keep_their_fingerprint(quantized_layer):
    layer, batches, targets = quantized_layer
    state = _state(layer)
    res = tune_layer(layer, batches, targets, {"steps": 0, "learn_planes": True})
    assert res.loss_after == res.loss_before
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items())
    assert "learn_planes" not in TuningOptions().fingerprint()
    assert TuningOptions(learn_planes=True).fingerprint()["planes_bound"] == 1.0
