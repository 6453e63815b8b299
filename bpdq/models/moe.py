"""Adapters for mixture-of-experts decoders: Qwen3-MoE, Qwen2-MoE (with a shared expert) and Mixtral.

In transformers 5.x their sparse MLP block (``mlp``) holds a top-k router ``mlp.gate`` (a module with a
``weight`` parameter, not an ``nn.Linear``: it stays in 16 bits, as do the norms and Qwen2-MoE's
``shared_expert_gate``) and the experts as one module ``mlp.experts`` with two fused 3-D parameters,
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``. A layer with such a block is calibrated in the groups
of :attr:`MoeLayout.groups`: attention as in Llama, the shared expert's linears (Qwen2-MoE) as a dense MLP,
then the experts as one group named by their two parameters (``mlp.experts.gate_up_proj``,
``mlp.experts.down_proj``; rules match these names), solved expert by expert (:mod:`bpdq.engine.moe`).
A layer whose ``mlp`` is dense (Qwen3-MoE's ``mlp_only_layers``) gets the Llama groups.

``save_pretrained`` writes the experts per expert under their original names (Mixtral:
``block_sparse_moe.experts.{e}.w1/w3/w2.weight``; Qwen: ``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``)
and ``from_pretrained`` fuses them; :meth:`MoeLayout.stored` gives a lazy reader the same mapping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from bpdq.models.base import FALLBACKS, Adapter, architecture_of, register_adapter
from bpdq.models.llama import LLAMA_GROUPS

ATTENTION_GROUPS = LLAMA_GROUPS[:2]
EXPERTS_GROUP = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@dataclass(frozen=True)
class MoeLayout:
    """Where a sparse layer's experts live and how a transformers checkpoint stores them.

    ``experts``: the fused experts module (relative to the layer). ``groups``: the sequential groups of a
    sparse layer. ``stored_block``: the name of the sparse block in stored tensor names when it differs from
    the module's (Mixtral's ``block_sparse_moe`` for ``mlp``). ``gate``/``up``/``down``: the per-expert
    linears' stored names."""

    experts: str = "mlp.experts"
    groups: tuple[tuple[str, ...], ...] = (*ATTENTION_GROUPS, EXPERTS_GROUP)
    stored_block: str | None = None
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    def module(self, layer: nn.Module) -> nn.Module | None:
        """The layer's fused experts module, or ``None`` if the layer's MLP is dense."""
        try:
            experts = layer.get_submodule(self.experts)
        except AttributeError:
            return None
        return experts if hasattr(experts, "gate_up_proj") or hasattr(experts, "gate_up_planes") else None

    def is_experts(self, names: tuple[str, ...] | list[str]) -> bool:
        """Whether a group of names is the experts group (``<experts>.gate_up_proj``, ``<experts>.down_proj``)."""
        return all(n.startswith(f"{self.experts}.") for n in names) and len(names) > 0

    def stored(self, name: str, available: set[str] | dict) -> tuple[list[str], Callable[[list[torch.Tensor]], torch.Tensor]] | None:
        """For a model tensor ``name`` (full, e.g. ``model.layers.0.mlp.experts.gate_up_proj``) missing from a
        checkpoint: the stored tensors it is made of (all in ``available``) and how to combine them, else
        ``None``."""
        block, _, rest = self.experts.partition(".")
        renamed = name
        if self.stored_block is not None:
            renamed = re.sub(rf"\.{re.escape(block)}\.", f".{self.stored_block}.", name)
            if renamed in available:
                return [renamed], lambda ts: ts[0]
        for param, parts in (("gate_up_proj", (self.gate, self.up)), ("down_proj", (self.down,))):
            suffix = f".{rest}.{param}" if rest else f".{param}"
            if not renamed.endswith(suffix):
                continue
            base = renamed[: -len(param)]
            per_expert: list[list[str]] = []
            e = 0
            while all(f"{base}{e}.{p}.weight" in available for p in parts):
                per_expert.append([f"{base}{e}.{p}.weight" for p in parts])
                e += 1
            if not per_expert:
                return None
            names = [n for group in per_expert for n in group]
            width = len(parts)
            return names, lambda ts: torch.stack([torch.cat(ts[i:i + width], dim=0) for i in range(0, len(ts), width)])
        return None


QWEN_MOE = MoeLayout()
QWEN2_MOE = MoeLayout(groups=(
    *ATTENTION_GROUPS,
    ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
    ("mlp.shared_expert.down_proj",),
    EXPERTS_GROUP,
))
MIXTRAL = MoeLayout(stored_block="block_sparse_moe", gate="w1", up="w3", down="w2")

#: Attention's output is ``o_proj``'s; a sparse block's output is not one linear's, so only attention has a tail.
MOE_TAILS: tuple[tuple[str, str], ...] = (("self_attn", "o_proj"),)

QWEN3_MOE_ADAPTER = register_adapter(Adapter("Qwen3MoeForCausalLM", groups=LLAMA_GROUPS, replay=("self_attn",),
                                             tails=MOE_TAILS, experts=QWEN_MOE))
QWEN2_MOE_ADAPTER = register_adapter(Adapter("Qwen2MoeForCausalLM", groups=LLAMA_GROUPS, replay=("self_attn",),
                                             tails=MOE_TAILS, experts=QWEN2_MOE))
MIXTRAL_ADAPTER = register_adapter(Adapter("MixtralForCausalLM", groups=LLAMA_GROUPS, replay=("self_attn",),
                                           tails=MOE_TAILS, experts=MIXTRAL))


def detect_moe_adapter(model: nn.Module) -> Adapter | None:
    """An adapter for an unregistered mixture of experts whose layers are unambiguous: ``model.layers`` whose
    linears are exactly Llama's attention (``self_attn.q/k/v/o_proj``) plus, per layer, either a dense Llama MLP
    or a sparse block ``mlp`` with a router ``mlp.gate`` (a ``weight [E, H]``, no linear), fused experts
    ``mlp.experts`` and at most a Qwen2-MoE-style shared expert (``mlp.shared_expert.gate/up/down_proj`` and
    ``mlp.shared_expert_gate``). Experts are read from a model directory under the Qwen names
    (``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``, the layout most transformers MoE models save).
    ``None`` for anything else (OLMoE is recognised; DeepSeek's layers, with other attention, are not)."""
    try:
        layers = model.get_submodule("model.layers")
        norm, head = model.get_submodule("model.norm"), model.get_submodule("lm_head")
    except AttributeError:
        return None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or norm is None or not isinstance(head, nn.Linear):
        return None
    attention = {n for g in ATTENTION_GROUPS for n in g}
    dense = {n for g in LLAMA_GROUPS for n in g}
    shared = {n for g in QWEN2_MOE.groups[2:4] for n in g}
    layout = None
    for layer in layers:
        linears = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        if linears == dense:
            continue
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if QWEN_MOE.module(layer) is None or isinstance(gate, nn.Linear) or getattr(gate, "weight", None) is None:
            return None
        if linears == attention:
            found = QWEN_MOE
        elif linears == attention | shared | {"mlp.shared_expert_gate"}:
            found = QWEN2_MOE
        else:
            return None
        if layout not in (None, found):
            return None
        layout = found
    if layout is None:
        return None  # dense: the Llama-shaped fallback's case
    return Adapter(architecture_of(model), groups=LLAMA_GROUPS, replay=("self_attn",), tails=MOE_TAILS, experts=layout)


FALLBACKS.append(detect_moe_adapter)
