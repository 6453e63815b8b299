"""Plain-PyTorch kernel: dequantize the packed weight, then a dense matmul.

The reference every accelerated kernel is tested against, and the fallback that runs everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bpdq.kernels.base import Kernel, PackedLinear
from bpdq.quantized import dequantize_packed
from bpdq.registry import KERNELS


@KERNELS.register("torch")
class TorchKernel(Kernel):
    priority = 0

    def forward(self, layer: PackedLinear, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_packed(layer.planes, layer.coeffs, layer.group_size).to(x.dtype)
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        return F.linear(x, w, bias)
