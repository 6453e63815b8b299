"""Adapter lookup, the unsupported-architecture error and the generic fallback."""

from __future__ import annotations

import pytest
from torch import nn

import bpdq
from bpdq.linear import QuantLinear
from bpdq.models import Adapter, generic_adapter, get_adapter
from tests.tiny_models import TINY_CALIBRATION, TINY_RECIPE, tiny_model, tiny_tokenizer


def test_unsupported_architecture_lists_supported_and_guide():
    model = tiny_model("llama", layers=1)
    model.config.architectures = ["MyLlamaForCausalLM"]
    with pytest.raises(ValueError) as exc:
        get_adapter(model)
    msg = str(exc.value)
    assert "MyLlamaForCausalLM" in msg and "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in msg
    assert "docs/guides/add-a-model.md" in msg


def test_generic_fallback_one_group_per_linear(register):
    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    model.config.architectures = ["MyLlamaForCausalLM"]
    adapter = register(bpdq.ADAPTERS, "MyLlamaForCausalLM", generic_adapter("MyLlamaForCausalLM"))
    groups = adapter.linear_groups(model.model.layers[0])
    assert groups == [[n] for n, m in model.model.layers[0].named_modules() if isinstance(m, nn.Linear)]
    report = bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, progress=False)
    assert report.n_quantized == 14
    assert all(not isinstance(m, nn.Linear) or n == "lm_head" for n, m in model.named_modules())
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)


def test_adapter_errors_name_the_problem():
    model = tiny_model("llama", layers=1)
    with pytest.raises(ValueError, match="transformer.h"):
        Adapter("X", layers="transformer.h").decoder_layers(model)
    with pytest.raises(ValueError, match="mlp.fc1"):
        Adapter("X", groups=(("mlp.fc1",),)).linear_groups(model.model.layers[0])
