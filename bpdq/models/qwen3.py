"""Adapter for ``Qwen3ForCausalLM``: the Llama layout; its q_norm/k_norm are RMSNorms, not linears, and stay
in full precision."""

from __future__ import annotations

from bpdq.models.base import Adapter, register_adapter
from bpdq.models.llama import LLAMA_GROUPS, LLAMA_TAILS

QWEN3 = register_adapter(Adapter("Qwen3ForCausalLM", groups=LLAMA_GROUPS, replay=("self_attn",), tails=LLAMA_TAILS))
