"""Model adapters: where a causal LM's decoder layers live and how their linears are quantized in order.

An :class:`Adapter` is data. ``layers`` is the dotted path of the ``nn.ModuleList`` of decoder layers,
``groups`` the sequential groups of linears inside one layer (names relative to the layer): every linear of
a group sees the same calibration pass, and the next group is calibrated on the outputs of the already
quantized ones (q,k,v -> o -> gate,up -> down). ``groups=None`` is the generic fallback: every linear of
the layer is its own group, in definition order. ``norm`` and ``head`` name the final norm and the output
projection (quantized only when a rule asks for it). ``replay`` names sub-blocks of a layer (e.g. the
attention block of a pre-norm layer) whose output is final once all their linears are quantized, because
their input only depends on earlier groups: the pipeline records that output once and replays it in the
layer's remaining calibration passes instead of recomputing it. ``tails`` pairs a sub-block with its last
linear (relative to the block) when the block's output is that linear's output (alone, or first in a tuple
whose other items are ``None``): the input of that linear, kept from the pass that calibrates it, then gives
the block's output for the recording pass without running the rest of the block (checked on the first
batch: :class:`~bpdq.engine.replay.Replay`). A tail's block is replayed like those of ``replay``.

Adapters are registered in ``bpdq.ADAPTERS`` under the ``architectures`` name of a transformers config.
A model without a registered adapter gets the Llama-shaped fallback when :func:`detect_adapter` recognises
it: a non-empty ``nn.ModuleList`` of decoder layers whose linears are exactly ``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj`` and ``down_proj`` (Mistral, Gemma, OLMo, ...). Anything
else (fused ``qkv_proj``, unregistered mixtures of experts) gets a clear error. ``experts`` describes the
sparse layers of a mixture-of-experts decoder (:mod:`bpdq.models.moe`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from bpdq.registry import ADAPTERS

GUIDE = "docs/guides/add-a-model.md"

#: The sequential groups of a Llama-shaped decoder layer, by the last component of the linears' names.
LLAMA_ROLES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("o_proj",),
    ("gate_proj", "up_proj"),
    ("down_proj",),
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Adapter:
    architecture: str
    layers: str = "model.layers"
    groups: tuple[tuple[str, ...], ...] | None = None
    norm: str = "model.norm"
    head: str = "lm_head"
    replay: tuple[str, ...] = ()
    tails: tuple[tuple[str, str], ...] = ()
    #: A mixture-of-experts layout (:class:`bpdq.models.moe.MoeLayout`): its ``groups`` replace ``groups`` in
    #: the layers whose MLP is sparse.
    experts: Any = None

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
        groups = self.groups
        present = set(linears)
        if self.experts is not None and self.experts.module(layer) is not None:
            groups = self.experts.groups
            present |= {n for g in groups if self.experts.is_experts(g) for n in g}
        if groups is None:
            return [[name] for name in linears]
        missing = [n for g in groups for n in g if n not in present]
        if missing:
            raise ValueError(
                f"adapter {self.architecture!r}: decoder layer has no linear(s) {missing}; its linears are {linears}"
            )
        return [list(g) for g in groups]


def register_adapter(adapter: Adapter) -> Adapter:
    """Register ``adapter`` under its architecture name (raises if the name is taken)."""
    return ADAPTERS.register(adapter.architecture)(adapter)


def generic_adapter(architecture: str, **fields: Any) -> Adapter:
    """An adapter that calibrates every linear of a layer as its own group, in definition order: for a
    decoder whose linears :func:`detect_adapter` does not recognise (register it with ``register_adapter``)."""
    return Adapter(architecture=architecture, groups=None, **fields)


def _llama_groups(layer: nn.Module) -> tuple[tuple[str, ...], ...] | None:
    """``layer``'s linears in the Llama groups, or ``None`` unless they are exactly the seven Llama roles
    (dense or already quantized: a quantized model is still recognised when it is saved)."""
    from bpdq.linear import QuantLinear

    linears = [name for name, mod in layer.named_modules() if isinstance(mod, (nn.Linear, QuantLinear))]
    by_role = {name.rpartition(".")[2]: name for name in linears}
    if len(by_role) != len(linears) or set(by_role) != {r for g in LLAMA_ROLES for r in g}:
        return None
    return tuple(tuple(by_role[r] for r in group) for group in LLAMA_ROLES)


def _name_of(model: nn.Module, target: nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is target), None) if target is not None else None


def detect_adapter(model: nn.Module) -> Adapter | None:
    """The Llama-shaped fallback for ``model`` (see the module docstring), or ``None`` if it is not one."""
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        groups = _llama_groups(mod[0])
        if groups is None:
            continue
        parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
        norm = getattr(parent, "norm", None)
        head = _name_of(model, model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
        if not isinstance(norm, nn.Module) or head is None:
            return None
        return Adapter(architecture_of(model), layers=path, groups=groups, norm=_name_of(model, norm), head=head)
    return None


#: The fallbacks :func:`get_adapter` tries, in order, for an architecture without a registered adapter: each
#: returns an adapter when it recognises the model unambiguously, else ``None`` (the mixture-of-experts one is
#: added by :mod:`bpdq.models.moe`).
FALLBACKS: list[Callable[[nn.Module], "Adapter | None"]] = [detect_adapter]


def architecture_of(model: nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__]
    return archs[0]


def get_adapter(model: nn.Module) -> Adapter:
    """The registered adapter for ``model``'s architecture, else the Llama-shaped fallback, else a clear error
    listing the supported architectures."""
    arch = architecture_of(model)
    if arch in ADAPTERS:
        return ADAPTERS.get(arch)
    for fallback in FALLBACKS:
        detected = fallback(model)
        if detected is not None:
            logger.info("%s has no registered adapter; using the %s fallback (layers at %s)", arch,
                        "mixture-of-experts" if detected.experts is not None else "Llama-shaped", detected.layers)
            return detected
    raise ValueError(
        f"unsupported architecture {arch!r}: no registered adapter, and its decoder layers are not Llama-shaped "
        f"(linears q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) nor a mixture of experts in "
        f"transformers' fused layout (Llama attention, mlp.gate, mlp.experts); registered: "
        f"{', '.join(ADAPTERS.names())}. To add one, register an Adapter (bpdq.models.register_adapter, or "
        f"bpdq.models.generic_adapter to calibrate each linear on its own): see {GUIDE}"
    )


def max_positions(model: nn.Module) -> int | None:
    """The most positions ``model`` was built for (``config.max_position_embeddings``), or ``None``."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_positions(model: nn.Module, n: int, what: str) -> None:
    """Raise ``ValueError`` if ``n`` positions (``what`` says whose) exceed what ``model`` was built for."""
    limit = max_positions(model)
    if limit is not None and n > limit:
        raise ValueError(f"{what} is {n} tokens, beyond the model's maximum of {limit} positions (max_position_embeddings)")
