"""One calibration batch as a decoder layer receives it, and moving nested arguments between devices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Batch:
    """A decoder layer's input for one batch of calibration windows: the hidden states (``[batch, seq,
    hidden]``, on the CPU, in the model's dtype) and the other arguments the layer is called with (attention
    mask, position embeddings...), shared by every layer."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside it (tuples, lists and dicts are walked) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
