"""The experimental output-aware Hessian stage (bpdq/engine/guided.py): its token weights are the squared
output gradients of the full-precision model's sampled-label loss, mix=0 is the loop's own Hessian, and it
plugs in by config name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bpdq
from bpdq.config import QuantizeConfig
from bpdq.engine.guided import GuidedHessian
from bpdq.engine.passes import token_windows
from tests.tiny_models import TINY_CALIBRATION, tiny_model, tiny_model_dir, tiny_tokenizer

GPTQ = {"group_size": 32, "grid": {"type": "bitplane", "planes": 2}, "solver": {"type": "bpdq", "iters": 2}}
CONFIG = {"quantize": GPTQ, "calibration": {**TINY_CALIBRATION, "batch_size": 4}, "progress": False}


class Recording(GuidedHessian):
    """Keeps the unnormalised squared gradients the stage computed (before they become weights)."""

    def setup(self, run):
        self.raw = {}
        original = self._batch_gradients

        def spy(plan, norm, head, batch, device, generator, grads):
            original(plan, norm, head, batch, device, generator, grads)
            for name, per_batch in grads.items():
                self.raw[name] = list(per_batch)

        self._batch_gradients = spy
        super().setup(run)


def _packed(model):
    return {n: (m.planes.clone(), m.coeffs.clone()) for n, m in model.named_modules() if isinstance(m, bpdq.QuantLinear)}


def test_mix_0_is_the_loops_own_hessian():
    plain, guided = tiny_model(), tiny_model()
    bpdq.quantize(plain, CONFIG, tokenizer=tiny_tokenizer())
    report = bpdq.quantize(guided, CONFIG, tokenizer=tiny_tokenizer(), stages=[GuidedHessian(mix=0.0)])
    a, b = _packed(plain), _packed(guided)
    assert a.keys() == b.keys() and len(a) == 14
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name
    assert report.extra["guided_hessian"]["linears"] == 14


def test_the_weights_are_the_squared_output_gradients_of_the_sampled_label_loss():
    model, reference = tiny_model(), tiny_model()
    stage = Recording(mix=1.0, seed=3)
    bpdq.quantize(model, CONFIG, tokenizer=tiny_tokenizer(), stages=[stage])
    # the same loss on the full-precision model, in one autograd graph: the same windows, batches of 4, labels
    # drawn in the same order (window by window) from a generator with the same seed
    windows = torch.stack(token_windows(tiny_tokenizer(), QuantizeConfig(**CONFIG).calibration,
                                        reference.get_input_embeddings().num_embeddings))
    generator = torch.Generator().manual_seed(3)
    name = "model.layers.0.self_attn.k_proj"
    for batch_index, ids in enumerate(windows.split(4)):
        outputs = {}

        def keep(module, args, out, outputs=outputs):
            out.retain_grad()
            outputs[names[module]] = out

        names = {reference.get_submodule(n): n for n in (name, "model.layers.1.mlp.down_proj")}
        handles = [m.register_forward_hook(keep) for m in names]
        logits = reference(ids).logits.float()
        labels = [torch.multinomial(torch.softmax(lg.detach(), -1), 1, generator=generator).squeeze(-1) for lg in logits]
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.cat(labels), reduction="sum").backward()
        for h in handles:
            h.remove()
        for n, out in outputs.items():
            expected = out.grad.pow(2).sum(-1).reshape(-1)
            torch.testing.assert_close(stage.raw[n][batch_index], expected, rtol=1e-3, atol=1e-9)
        reference.zero_grad()
    assert stage.weights == {}  # each linear's weights dropped once its Hessian is summed


def test_mix_1_changes_the_solution_and_the_weights_average_1():
    plain, guided = tiny_model(), tiny_model()
    bpdq.quantize(plain, CONFIG, tokenizer=tiny_tokenizer())
    stage = Recording(mix=1.0)
    bpdq.quantize(guided, CONFIG, tokenizer=tiny_tokenizer(), stages=[stage])
    a, b = _packed(plain), _packed(guided)
    assert any(not torch.equal(a[n][1], b[n][1]) for n in a)
    for name, raw in stage.raw.items():
        g = torch.cat(raw)
        assert (g >= 0).all() and g.max() > g.min(), name


def test_named_in_the_config_and_bad_arguments():
    report = bpdq.quantize(tiny_model(), {**CONFIG, "stages": [{"type": "guided_hessian", "mix": 0.5}]},
                           tokenizer=tiny_tokenizer())
    assert report.extra["guided_hessian"]["mix"] == 0.5
    with pytest.raises(ValueError, match=r"mix must be a number in \[0, 1\]"):
        GuidedHessian(mix=1.5)
    with pytest.raises(ValueError, match="'asymmetric', 'guided_hessian' all compute the Hessians"):
        bpdq.quantize(tiny_model(), {**CONFIG, "calibration": {**CONFIG["calibration"], "asymmetric": True}},
                      tokenizer=tiny_tokenizer(), stages=[GuidedHessian()])


def test_a_model_read_from_a_directory_is_refused_before_any_layer(tmp_path):
    src = tiny_model_dir(tmp_path / "src")
    with pytest.raises(ValueError, match="guided_hessian needs the model in memory"):
        bpdq.quantize(src, {**CONFIG, "output": str(tmp_path / "out")}, stages=[GuidedHessian()])
    assert not (tmp_path / "out" / "model.safetensors").exists()


ASYMMETRIC = {**CONFIG, "calibration": {**CONFIG["calibration"], "asymmetric": True}}


def test_asymmetric_with_mix_0_is_asymmetric_calibration_byte_for_byte():
    plain, guided = tiny_model(), tiny_model()
    bpdq.quantize(plain, ASYMMETRIC, tokenizer=tiny_tokenizer())
    report = bpdq.quantize(guided, CONFIG, tokenizer=tiny_tokenizer(), stages=[GuidedHessian(mix=0.0, asymmetric=True)])
    a, b = _packed(plain), _packed(guided)
    assert a.keys() == b.keys() and len(a) == 14
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name
    assert report.stages == ["fp_stream", "guided_hessian"] and report.asymmetric == {"damp": 0.1}
    assert report.extra["guided_hessian"]["asymmetric"] is True


def test_asymmetric_with_mix_1_weights_the_asymmetric_sums():
    plain, guided, symmetric = tiny_model(), tiny_model(), tiny_model()
    bpdq.quantize(plain, ASYMMETRIC, tokenizer=tiny_tokenizer())
    stage = GuidedHessian(mix=1.0, asymmetric=True)
    bpdq.quantize(guided, CONFIG, tokenizer=tiny_tokenizer(), stages=[stage])
    bpdq.quantize(symmetric, CONFIG, tokenizer=tiny_tokenizer(), stages=[GuidedHessian(mix=1.0)])
    a, b, c = _packed(plain), _packed(guided), _packed(symmetric)
    assert any(not torch.equal(a[n][1], b[n][1]) for n in a)  # not the unweighted asymmetric sums
    assert any(not torch.equal(c[n][1], b[n][1]) for n in a)  # nor the weighted symmetric Hessian
    assert stage.weights == {}
    with pytest.raises(ValueError, match="asymmetric must be true or false"):
        GuidedHessian(asymmetric="yes")


def test_the_heap_is_trimmed_after_each_batch_of_the_gradient_pass(monkeypatch):
    import bpdq.engine.guided as guided

    calls = []
    monkeypatch.setattr(guided, "return_freed_memory", lambda: calls.append(1))
    bpdq.quantize(tiny_model(), CONFIG, tokenizer=tiny_tokenizer(), stages=[GuidedHessian(mix=0.5)])
    batches = -(-QuantizeConfig(**CONFIG).calibration.samples // 4)
    assert len(calls) == batches > 1
