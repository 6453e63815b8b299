"""Steps shared by the commands: plugins, devices, models and texts, each failing as a ``UsageError``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from bpdq.cli.errors import UsageError, usage_phase
from bpdq.cli.plugins import import_plugin


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def load_plugins(specs: Sequence[str]) -> None:
    for spec in specs:
        import_plugin(spec)


def device_for(spec: str) -> Any:
    """A ``torch.device`` for ``auto | cpu | cuda | cuda:N``."""
    from bpdq.devices import resolve_device

    with usage_phase("device"):
        return resolve_device(spec)


def load_model(name_or_path: str, device: Any, what: str = "model", dtype: str = "auto") -> tuple[Any, Any]:
    """``(model, tokenizer)`` for an alias, a model directory, a bpdq checkpoint or a hub id.

    ``dtype`` ("auto" = as stored) applies to full-precision models; a bpdq checkpoint keeps its own dtype.
    """
    from bpdq.models import load_pretrained

    with usage_phase(f"{what} {name_or_path!r}"):
        return load_pretrained(name_or_path, device=str(device), dtype=None if dtype == "auto" else dtype)


def load_checkpoint(directory: str, device: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a bpdq checkpoint directory (anything else is a usage error)."""
    from bpdq.checkpoint import load

    path = Path(directory)
    if not path.is_dir():
        raise UsageError(f"checkpoint {directory!r} is not a directory (give the output directory of `bpdq quantize`)")
    with usage_phase(f"checkpoint {directory!r}"):
        return load(path, device=str(device))


def load_text(spec: str, what: str = "--text") -> str:
    from bpdq.calibration import load_text as _load_text

    with usage_phase(what):
        text = _load_text(spec)
    if not text.strip():
        raise UsageError(f"{what}: {spec!r} holds no text")
    return text


#: Set by a command that joined a process group of several ranks (and left it): see :func:`bpdq.cli.main.main`.
_LEFT_GROUP = False


def left_distributed_group() -> None:
    global _LEFT_GROUP
    _LEFT_GROUP = True


def distributed_rank_left() -> bool:
    return _LEFT_GROUP
