"""Model adapters: where a causal LM's decoder layers live and how their linears are quantized in order.

An :class:`Adapter` is data. ``layers`` is the dotted path of the ``nn.ModuleList`` of decoder layers,
``groups`` the sequential groups of linears inside one layer (names relative to the layer): every linear of
a group sees the same calibration pass, and the next group is calibrated on the outputs of the already
quantized ones (q,k,v -> o -> gate,up -> down). ``groups=None`` is the generic fallback: every linear of
the layer is its own group, in definition order. ``norm`` and ``head`` name the final norm and the output
projection (quantized only when a rule asks for it). ``replay`` names sub-blocks of a layer (e.g. the
attention block of a pre-norm layer) whose output is final once all their linears are quantized, because
their input only depends on earlier groups: the pipeline records that output once and replays it in the
layer's remaining calibration passes instead of recomputing it.

Adapters are registered in ``bpdq.ADAPTERS`` under the ``architectures`` name of a transformers config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from bpdq.registry import ADAPTERS

GUIDE = "docs/guides/add-a-model.md"


@dataclass(frozen=True)
class Adapter:
    architecture: str
    layers: str = "model.layers"
    groups: tuple[tuple[str, ...], ...] | None = None
    norm: str = "model.norm"
    head: str = "lm_head"
    replay: tuple[str, ...] = ()

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        try:
            layers = model.get_submodule(self.layers)
        except AttributeError:
            raise ValueError(
                f"adapter {self.architecture!r}: the model has no module {self.layers!r} holding its decoder layers"
            ) from None
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise ValueError(f"adapter {self.architecture!r}: {self.layers!r} is not a non-empty nn.ModuleList")
        return layers

    def linear_groups(self, layer: nn.Module) -> list[list[str]]:
        """The sequential groups of ``layer``'s linears (names relative to the layer)."""
        linears = [name for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)]
        if self.groups is None:
            return [[name] for name in linears]
        present = set(linears)
        missing = [n for g in self.groups for n in g if n not in present]
        if missing:
            raise ValueError(
                f"adapter {self.architecture!r}: decoder layer has no linear(s) {missing}; its linears are {linears}"
            )
        return [list(g) for g in self.groups]


def register_adapter(adapter: Adapter) -> Adapter:
    """Register ``adapter`` under its architecture name (raises if the name is taken)."""
    return ADAPTERS.register(adapter.architecture)(adapter)


def generic_adapter(architecture: str, **fields: Any) -> Adapter:
    """The fallback for a Llama-shaped model without its own adapter: each linear is its own group."""
    return Adapter(architecture=architecture, groups=None, **fields)


def architecture_of(model: nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__]
    return archs[0]


def get_adapter(model: nn.Module) -> Adapter:
    """The registered adapter for ``model``'s architecture, or a clear error listing the supported ones."""
    arch = architecture_of(model)
    if arch in ADAPTERS:
        return ADAPTERS.get(arch)
    raise ValueError(
        f"unsupported architecture {arch!r}; supported: {', '.join(ADAPTERS.names())}. To add one, register an "
        f"Adapter (bpdq.models.register_adapter, or bpdq.models.generic_adapter for a Llama-shaped model): "
        f"see {GUIDE}"
    )
