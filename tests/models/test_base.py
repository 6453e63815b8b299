"""Adapter lookup, the unsupported-architecture error and the generic fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bpdq
from bpdq.linear import QuantLinear
from bpdq.models import Adapter, generic_adapter, get_adapter
from bpdq.models.llama import LLAMA_GROUPS
from tests.tiny_models import TINY_CALIBRATION, TINY_RECIPE, tiny_model, tiny_tokenizer


def test_unsupported_architecture_lists_supported_and_guide():
    model = tiny_model("phi3", layers=1)  # fused qkv_proj and gate_up_proj: not Llama-shaped
    with pytest.raises(ValueError) as exc:
        get_adapter(model)
    msg = str(exc.value)
    assert "Phi3ForCausalLM" in msg and "LlamaForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, Qwen2MoeForCausalLM" in msg
    assert "not Llama-shaped" in msg and "docs/guides/add-a-model.md" in msg


GPTQ_RECIPE = {"group_size": 32, "grid": {"type": "uniform", "bits": 2}, "solver": "gptq"}


@pytest.mark.parametrize("arch", ["mistral", "gemma"])
def test_llama_shaped_fallback_quantizes_like_the_llama_adapter(arch, register):
    """The fallback finds the layers and the q,k,v -> o -> gate,up -> down groups: GPTQ (whose result depends
    on the groups' calibration order) gives exactly what an explicitly registered Llama adapter gives."""
    tok = tiny_tokenizer()
    fallback_model, explicit_model = tiny_model(arch, layers=2), tiny_model(arch, layers=2)
    name = explicit_model.config.architectures[0]
    assert name not in bpdq.ADAPTERS
    adapter = get_adapter(fallback_model)
    assert adapter.layers == "model.layers" and adapter.norm == "model.norm" and adapter.head == "lm_head"
    assert adapter.linear_groups(fallback_model.model.layers[0]) == [list(g) for g in LLAMA_GROUPS]
    report = bpdq.quantize_model(fallback_model, tok, recipe=GPTQ_RECIPE, calibration=TINY_CALIBRATION, progress=False)
    assert report.n_quantized == 14
    register(bpdq.ADAPTERS, name, Adapter(name, groups=LLAMA_GROUPS))
    bpdq.quantize_model(explicit_model, tok, recipe=GPTQ_RECIPE, calibration=TINY_CALIBRATION, progress=False)
    found, expected = fallback_model.state_dict(), explicit_model.state_dict()
    assert sorted(found) == sorted(expected) and "model.layers.1.mlp.down_proj.planes" in found
    assert all(torch.equal(found[k], expected[k]) for k in expected)


def test_generic_fallback_one_group_per_linear(register):
    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    model.config.architectures = ["MyLlamaForCausalLM"]  # registered below: the registration wins
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
