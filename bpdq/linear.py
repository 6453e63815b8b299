"""QuantLinear: an ``nn.Linear`` replacement holding packed bit-planes and fp16 coefficients.

Buffers (its ``state_dict``): ``planes`` ``uint8[k, out, in/8]``, ``coeffs`` ``float16[groups, k+1, out]``
and an optional ``bias``. ``forward`` goes through the kernel registry (``kernel="auto"`` by default).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bpdq.kernels.base import check_kernel_name, select_kernel
from bpdq.quantized import COEFF_BITS, QuantizedWeight, check_group_size


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        planes: int,
        group_size: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        kernel: str = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= planes <= 8:
            raise ValueError(f"planes must be in 1..8, got {planes}")
        check_group_size(group_size, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.k = planes
        self.group_size = group_size
        self.kernel = check_kernel_name(kernel)
        self.register_buffer("planes", torch.zeros(planes, out_features, in_features // 8, dtype=torch.uint8, device=device))
        self.register_buffer(
            "coeffs", torch.zeros(in_features // group_size, planes + 1, out_features, dtype=torch.float16, device=device)
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._kernel_cache: dict[str, Any] = {}

    # ---- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight, bias: torch.Tensor | None = None, kernel: str = "auto") -> "QuantLinear":
        if not isinstance(qweight, QuantizedWeight):
            raise TypeError(f"qweight must be a QuantizedWeight, got {type(qweight).__name__}")
        out, inp = qweight.shape
        if bias is not None and tuple(bias.shape) != (out,):
            raise ValueError(f"bias must have shape ({out},), got {tuple(bias.shape)}")
        layer = cls(
            inp,
            out,
            planes=qweight.k,
            group_size=qweight.group_size,
            bias=bias is not None,
            dtype=bias.dtype if bias is not None else qweight.dtype,
            kernel=kernel,
            device=qweight.planes.device,
        )
        layer.planes.copy_(qweight.planes)
        layer.coeffs.copy_(qweight.coeffs)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        grid: Any,
        solver: Any = "rtn",
        group_size: int,
        hessian: torch.Tensor | None = None,
        kernel: str = "auto",
    ) -> "QuantLinear":
        """Quantize an ``nn.Linear`` with a recipe (names, dicts or instances, as in :func:`bpdq.quantize_weight`)."""
        from bpdq.api import quantize_weight

        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        qw = quantize_weight(linear.weight, hessian, grid=grid, solver=solver, group_size=group_size)
        return cls.from_quantized(qw, linear.bias, kernel=kernel)

    def quantized_weight(self) -> QuantizedWeight:
        """The layer's weight as a :class:`QuantizedWeight` (sharing the buffers)."""
        return QuantizedWeight(
            planes=self.planes,
            coeffs=self.coeffs,
            group_size=self.group_size,
            shape=(self.out_features, self.in_features),
            dtype=self.bias.dtype if self.bias is not None else torch.float32,
        )

    # ---- compute --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension must be in_features={self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = select_kernel(self.kernel, self, x2).forward(self, x2)
        return y.reshape(*lead, self.out_features)

    def set_kernel(self, kernel: str) -> None:
        self.kernel = check_kernel_name(kernel)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "QuantLinear":
        # Moving or casting the module invalidates kernel repacks; packed buffers keep their dtypes.
        self._kernel_cache = {}
        planes, coeffs = self.planes, self.coeffs
        super()._apply(fn, *args, **kwargs)
        dev = self.planes.device
        self.planes = planes.to(dev)
        self.coeffs = coeffs.to(dev)
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # Loading overwrites the packed buffers in place: repacks made from the old values are stale.
        self._kernel_cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def bits_per_weight(self) -> float:
        return self.k + COEFF_BITS * (self.k + 1) / self.group_size

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"planes={self.k}, group_size={self.group_size}, bpw={self.bits_per_weight:.3f}, kernel={self.kernel}"
        )
