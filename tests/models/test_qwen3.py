"""Qwen3: q_norm/k_norm are RMSNorms that stay in full precision."""

from __future__ import annotations

import torch
from torch import nn

import bpdq
from bpdq.linear import QuantLinear
from tests.tiny_models import TINY_CALIBRATION, TINY_RECIPE, tiny_model, tiny_tokenizer


def test_qwen3_norms_untouched():
    model = tiny_model("qwen3", layers=1)
    norm_before = model.model.layers[0].self_attn.q_norm.weight.clone()
    bpdq.quantize_model(model, tiny_tokenizer(), recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, progress=False)
    attn = model.model.layers[0].self_attn
    assert not isinstance(attn.q_norm, (nn.Linear, QuantLinear)) and torch.equal(attn.q_norm.weight, norm_before)
    assert isinstance(attn.q_proj, QuantLinear)
