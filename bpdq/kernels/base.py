"""The Kernel interface and dispatch (``kernel = "auto" | <registered name>``).

A kernel computes ``y = x @ W_hat^T + bias`` for a :class:`~bpdq.linear.QuantLinear` directly from its
packed buffers. ``supports(layer, x)`` returns ``None`` when the kernel can run the call, or a sentence
saying why not. ``auto`` tries registered kernels by descending ``priority`` and takes the first that
supports the call and does not exclude itself from automatic choice (``auto_excluded``: Triton kernels run
on the CPU only under the interpreter, for tests, so ``auto`` leaves them out there); the plain-PyTorch
kernel (priority 0) supports everything and is the fallback. An explicit choice that cannot run raises
:class:`KernelUnavailableError` with the reason.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol

import torch

from bpdq.registry import KERNELS


class PackedLinear(Protocol):
    """What a kernel reads from a layer (:class:`~bpdq.linear.QuantLinear` is one): the packed buffers
    (docs/format.md), their sizes, and a per-layer cache for :meth:`Kernel.packed`. Kernels depend on this
    protocol rather than on ``bpdq.linear``, which itself imports the dispatch below."""

    in_features: int
    out_features: int
    k: int
    group_size: int
    planes: torch.Tensor
    coeffs: torch.Tensor
    bias: torch.Tensor | None
    _kernel_cache: dict[str, Any]


class KernelUnavailableError(RuntimeError):
    """An explicitly requested kernel cannot run this call (the message says why)."""


class Kernel(ABC):
    name: ClassVar[str] = "<unregistered>"
    #: ``auto`` prefers higher priorities.
    priority: ClassVar[int] = 0

    def supports(self, layer: PackedLinear, x: torch.Tensor) -> str | None:
        """``None`` if this kernel can compute ``layer(x)`` (``x`` is 2-D), else the reason it cannot."""
        return None

    def serves(self, planes: int, group_size: int) -> str | None:
        """``None`` if this kernel can run *every* call of a layer with ``planes`` and ``group_size`` (any
        number of tokens, on a device it runs on), else why not. A kernel named in a recipe runs every call of
        its layers (calibration, prefill and decode), so recipes accept only kernels that serve them."""
        return None

    def runs_on(self, device: torch.device) -> str | None:
        """``None`` if this kernel can run calls on ``device`` at all, else why not (checked before a run
        quantizes layers for it)."""
        return None

    def auto_excluded(self, layer: PackedLinear, x: torch.Tensor) -> str | None:
        """Why ``auto`` should skip this kernel for a call it supports (``None``: ``auto`` may pick it).

        For kernels that can run somewhere only for testing (Triton under ``TRITON_INTERPRET=1`` on the CPU).
        """
        return None

    def skipped(self, reason: str) -> None:
        """``auto`` passed this kernel over for a call, for ``reason`` (from :meth:`supports`): the place to
        warn that a faster kernel is unavailable. An explicit choice that cannot run raises instead."""

    def prepare(self, layer: PackedLinear) -> object:
        """Kernel-specific repacking of the layer's canonical buffers, computed once and cached on the layer.

        The default keeps the canonical layout (returns ``None``).
        """
        return None

    def packed(self, layer: PackedLinear) -> object:
        """Cached result of :meth:`prepare` for ``layer``."""
        cache = layer._kernel_cache
        if self.name not in cache:
            cache[self.name] = self.prepare(layer)
        return cache[self.name]

    @abstractmethod
    def forward(self, layer: PackedLinear, x: torch.Tensor) -> torch.Tensor:
        """``x: [M, in]`` -> ``[M, out]`` in ``x.dtype``, bias included."""


_INSTANCES: dict[str, Kernel] = {}


def get_kernel(name: str) -> Kernel:
    """The (stateless, cached) instance of the kernel registered as ``name``."""
    cls = KERNELS.get(name)
    inst = _INSTANCES.get(name)
    if inst is None or type(inst) is not cls:
        inst = _INSTANCES[name] = cls()
    return inst


def check_kernel_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"kernel must be a string ('auto' or one of {KERNELS.names()}), got {type(name).__name__}")
    if name != "auto":
        KERNELS.get(name)  # raises with the known names
    return name


def check_kernel_device(name: str, device: torch.device) -> None:
    """Raise ``ValueError`` if kernel ``name`` (``"auto"`` always runs) cannot run on ``device``, naming the
    kernels that can."""
    if name == "auto":
        return
    reason = get_kernel(name).runs_on(device)
    if reason is not None:
        usable = ["auto", *sorted(n for n in KERNELS.names() if get_kernel(n).runs_on(device) is None)]
        raise ValueError(f"kernel {name!r} cannot run on {device.type}: {reason}; kernels that run on "
                         f"{device.type}: {', '.join(usable)}")


def select_kernel(choice: str, layer: PackedLinear, x: torch.Tensor) -> Kernel:
    """Resolve ``choice`` ("auto" or a name) to a kernel that can run ``layer(x)``."""
    if choice != "auto":
        kernel = get_kernel(choice)
        reason = kernel.supports(layer, x)
        if reason is not None:
            raise KernelUnavailableError(f"kernel {choice!r} cannot run this layer: {reason}")
        return kernel
    reasons = []
    for name in sorted(KERNELS.names(), key=lambda n: (-KERNELS.get(n).priority, n)):
        kernel = get_kernel(name)
        reason = kernel.supports(layer, x) or kernel.auto_excluded(layer, x)
        if reason is None:
            return kernel
        kernel.skipped(reason)
        reasons.append(f"{name}: {reason}")
    raise KernelUnavailableError("no registered kernel supports this call: " + "; ".join(reasons))
