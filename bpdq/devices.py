"""Device names: ``auto | cpu | cuda | cuda:N``, checked before any work (the one rule for every entry point),
and whether a device computes in bfloat16 natively."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Literal

import torch

ALLOWED = "'auto', 'cpu', 'cuda', 'cuda:N'"
_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str) -> str:
    """``name`` if it is one of ``auto | cpu | cuda | cuda:N`` (whether this machine has it is not asked:
    a config may be written for another machine); ``ValueError`` otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError("is not one of auto, cpu, cuda, cuda:N")
    return name


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a ``torch.device``.

    A CUDA device that this machine does not have raises ``ValueError`` now, not after a model was loaded.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {type(device).__name__}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; allowed: {ALLOWED}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; allowed: {ALLOWED}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was requested but CUDA is not available; use 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


# CPU flags (Linux /proc/cpuinfo names) of bfloat16 matrix units: AMX tiles or AVX512-BF16 dot products
_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@functools.cache
def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux lists them; empty where that file does not exist (macOS, Windows)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    flags = next((line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(flags.split())


def fast_bfloat16(device: str | torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA device that supports bfloat16, or a
    CPU with AMX or AVX512-BF16 (on other CPUs bfloat16 products are emulated, several times slower than
    float32)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return dev.type == "cpu" and bool(_cpu_flags() & _BF16_CPU_FLAGS)


#: The values of the ``autocast`` options (``calibration.autocast``, ``tuning.autocast``) and their dtypes.
Autocast = Literal["none", "bfloat16", "float16", "auto"]
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_autocast(name: str, device: str | torch.device) -> str:
    """An ``autocast`` option's value with ``auto`` resolved for ``device``: ``bfloat16`` where
    :func:`fast_bfloat16`, else ``none``; another allowed value is returned as it is."""
    if name == "auto":
        return "bfloat16" if fast_bfloat16(device) else "none"
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be one of {[*AUTOCAST_DTYPES, 'auto']}, got {name!r}")
    return name
