"""What the Triton kernels share: lazy access to triton, the device rules, and lazily built ``@triton.jit`` code.

Nothing here imports triton at import time. ``@triton.jit`` decides between compiling for the GPU and the
CPU interpreter when it decorates a function, so the kernels are built on first use (once per mode) by
:func:`lazy_jit`, and ``TRITON_INTERPRET`` is read then, not when bpdq is imported.

Device rules: a Triton kernel runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` (for
testing). ``auto`` picks Triton kernels only on CUDA: the interpreter is far slower than the torch kernel.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, Callable

import torch

from bpdq.kernels.base import PackedLinear

#: Activation dtypes the Triton kernels accept (outputs have the same dtype).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Plane counts and group sizes the Triton kernels are built for.
PLANES = (1, 2, 3, 4)
GROUP_SIZES = (32, 64, 128, 256)

_TRUE = {"1", "true", "on", "yes", "y"}  # the values triton itself reads as true


def interpret_mode() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the CPU interpreter (read now, as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def on_cuda(x: torch.Tensor) -> bool:
    """The device probe behind dispatch (tests monkeypatch it to dispatch as if on a GPU)."""
    return x.device.type == "cuda"


def device_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` at all, or ``None``."""
    if not triton_importable():
        return "triton is not installed (pip install triton)"
    if device.type != "cuda" and not interpret_mode():
        return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 to run them on the CPU for testing)"
    return None


def call_reason(layer: PackedLinear, x: torch.Tensor) -> str | None:
    """Why a Triton kernel cannot run ``layer(x)`` (device, dtype, plane count, group size), or ``None``."""
    if not triton_importable():
        return "triton is not installed (pip install triton)"
    if x.device != layer.planes.device:
        return f"the input is on {x.device} but the layer's planes are on {layer.planes.device}"
    interpret = interpret_mode()
    if not on_cuda(x) and not interpret:
        return (
            f"tensors are on {x.device.type!r}; Triton kernels need a CUDA device "
            "(or TRITON_INTERPRET=1 to run them on the CPU for testing)"
        )
    if x.dtype not in DTYPES:
        return f"input dtype {x.dtype} is not supported; allowed: {[str(d) for d in DTYPES]}"
    if x.dtype == torch.bfloat16 and interpret:
        return "the Triton interpreter computes bfloat16 wrongly; use float16/float32 (or a GPU, uninterpreted)"
    return recipe_reason(layer.k, layer.group_size)


def recipe_reason(planes: int, group_size: int) -> str | None:
    """Why the Triton kernels cannot serve layers with ``planes`` and ``group_size``, or ``None``."""
    if planes not in PLANES:
        return f"{planes} planes are not supported; allowed: {list(PLANES)}"
    if group_size not in GROUP_SIZES:
        return f"group size {group_size} is not supported; allowed: {list(GROUP_SIZES)}"
    return None


def auto_reason(x: torch.Tensor) -> str | None:
    """Why ``auto`` should not pick a Triton kernel for ``x`` (anything not on CUDA), or ``None``."""
    if not on_cuda(x):
        return "auto uses Triton kernels only on CUDA (the interpreter is for testing; ask for it by name)"
    return None


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def lazy_jit(builder: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap a function that imports triton and returns jitted kernels: build them once per interpret mode."""
    built: dict[bool, Any] = {}

    @functools.wraps(builder)
    def get() -> Any:
        mode = interpret_mode()
        if mode not in built:
            built[mode] = builder()
        return built[mode]

    return get
