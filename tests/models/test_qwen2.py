"""Qwen2: the q/k/v biases survive quantization exactly."""

from __future__ import annotations

import torch

import bpdq
from bpdq.linear import QuantLinear
from tests.tiny_models import TINY_CALIBRATION, TINY_RECIPE, tiny_model, tiny_tokenizer


def test_qwen2_biases_kept_exactly():
    model = tiny_model("qwen2", layers=1)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.bias.normal_()
    bias = model.model.layers[0].self_attn.k_proj.bias.clone()
    bpdq.quantize_model(model, tiny_tokenizer(), recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, progress=False)
    k = model.model.layers[0].self_attn.k_proj
    assert isinstance(k, QuantLinear) and torch.equal(k.bias, bias)
