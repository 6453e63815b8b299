"""Model adapters (registered in ``bpdq.ADAPTERS`` by architecture) and model loading."""

from bpdq.models import llama, moe, qwen2, qwen3  # noqa: F401  (register the built-in adapters)
from bpdq.models.base import (
    Adapter,
    architecture_of,
    check_positions,
    detect_adapter,
    generic_adapter,
    get_adapter,
    max_positions,
    register_adapter,
)
from bpdq.models.hub import BUILTIN_MODELS, load_pretrained

__all__ = [
    "BUILTIN_MODELS",
    "Adapter",
    "architecture_of",
    "check_positions",
    "detect_adapter",
    "generic_adapter",
    "get_adapter",
    "load_pretrained",
    "max_positions",
    "register_adapter",
]
