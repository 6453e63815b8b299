"""The Llama-family adapters (Llama, Qwen2, Qwen3) describe every linear of a decoder layer, in order."""

from __future__ import annotations

import pytest
from torch import nn

import bpdq
from bpdq.models import get_adapter
from bpdq.models.llama import LLAMA_GROUPS
from tests.tiny_models import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_groups_cover_every_linear_once(arch):
    model = tiny_model(arch, layers=1)
    adapter = get_adapter(model)
    assert adapter is bpdq.ADAPTERS.get(model.config.architectures[0])
    layer = adapter.decoder_layers(model)[0]
    groups = adapter.linear_groups(layer)
    flat = [n for g in groups for n in g]
    linears = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(flat) == sorted(linears) and len(flat) == len(set(flat)) == 7
    assert groups[0] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] and groups[-1] == ["mlp.down_proj"]


def test_sequential_order_is_q_k_v_then_o_then_gate_up_then_down():
    assert [len(g) for g in LLAMA_GROUPS] == [3, 1, 2, 1]
    assert LLAMA_GROUPS[1] == ("self_attn.o_proj",) and LLAMA_GROUPS[2] == ("mlp.gate_proj", "mlp.up_proj")
