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


def tokenizer_for(model_name: str, tokenizer: Any, spec: str | None) -> Any:
    """The tokenizer a command runs with: the one ``--tokenizer`` names (a directory or hub id) over the
    model's own; a model without one and no flag is a usage error."""
    if spec is not None:
        from transformers import AutoTokenizer

        with usage_phase(f"--tokenizer {spec!r}"):
            try:
                return AutoTokenizer.from_pretrained(str(Path(spec).expanduser()) if Path(spec).expanduser().exists()
                                                     else spec)
            except OSError as exc:
                raise ValueError(f"no tokenizer there: {str(exc).splitlines()[0]}") from None
    if tokenizer is None:
        raise UsageError(f"{model_name} has no tokenizer (it was quantized from a directory without one): pass "
                         "--tokenizer DIR_OR_HUB_ID, e.g. the original model's")
    return tokenizer


def check_utf8(text: str, what: str) -> None:
    """A command-line text that held bytes invalid in UTF-8 (Python keeps them as lone surrogates) is a usage error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start].encode("utf-8", "surrogateescape")
        raise UsageError(f"{what} is not valid UTF-8 (byte 0x{bad.hex()} at character {exc.start}); "
                         "give the text in UTF-8") from None


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
