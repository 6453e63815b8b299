"""Adapter for ``Qwen2ForCausalLM``: the Llama layout; q/k/v carry biases (kept in full precision)."""

from __future__ import annotations

from bpdq.models.base import Adapter, register_adapter
from bpdq.models.llama import LLAMA_GROUPS, LLAMA_TAILS

QWEN2 = register_adapter(Adapter("Qwen2ForCausalLM", groups=LLAMA_GROUPS, replay=("self_attn",), tails=LLAMA_TAILS))
