"""The column-major plane layout that the lookup-table kernels (``cpu_lut``, ``triton_lut``) read.

A layer's ``planes`` buffer always has the canonical shape and values ``uint8[k, out, in/8]`` (docs/format.md).
Its *storage* may be either row-major (contiguous, as checkpoints store it) or column-major: strides
``(in/8 * out, 1, out)``, i.e. the bytes laid out as ``[k, in/8, out]`` so that one byte column of many
consecutive rows is contiguous (one vector load). The column-major tensor is the same values with other
strides, so everything that indexes ``planes`` (the torch kernel, ``quantized_weight()``, ``state_dict``,
saving with ``.contiguous()``) keeps working, and the layer holds one copy of the planes, not two.
"""

from __future__ import annotations

import torch

from bpdq.kernels.base import PackedLinear


def is_column_major(planes: torch.Tensor) -> bool:
    """Whether ``planes [k, out, in/8]`` is stored as ``[k, in/8, out]`` (strides of size-1 dims ignored)."""
    return planes.transpose(1, 2).is_contiguous()


def column_major_planes(layer: PackedLinear) -> torch.Tensor:
    """``layer.planes``, relaid out column-major in place of the old buffer the first time (a no-op after)."""
    planes = layer.planes
    if is_column_major(planes):
        return planes
    layer.planes = planes.transpose(1, 2).contiguous().transpose(1, 2)
    return layer.planes
