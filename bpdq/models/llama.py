"""Adapter for ``LlamaForCausalLM``: decoder layers at ``model.layers``, linears in the sequential groups
q,k,v -> o -> gate,up -> down."""

from __future__ import annotations

from bpdq.models.base import Adapter, register_adapter

LLAMA_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

#: The attention block's output is ``o_proj``'s (first of ``(output, None)``), the MLP's is ``down_proj``'s.
LLAMA_TAILS: tuple[tuple[str, str], ...] = (("self_attn", "o_proj"), ("mlp", "down_proj"))

LLAMA = register_adapter(Adapter("LlamaForCausalLM", groups=LLAMA_GROUPS, replay=("self_attn",), tails=LLAMA_TAILS))
