"""QuantLinear: an ``nn.Linear`` replacement holding packed bit-planes and fp16 coefficients.

Buffers (its ``state_dict``): ``planes`` ``uint8[k, out, in/8]``, ``coeffs`` ``float16[groups, k+1, out]``
and an optional ``bias``. ``forward`` goes through the kernel registry (``kernel="auto"`` by default); the
choice is made once per input signature. A lookup-table kernel may relay ``planes`` out column-major in
place (same shape and values, other strides; see :mod:`bpdq.kernels.layout`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bpdq.kernels.base import Kernel, check_kernel_name, select_kernel
from bpdq.quantized import QuantizedWeight, bits_per_weight, check_group_size
from bpdq.registry import KERNELS
from bpdq.solvers.build import quantize_weight

#: Most input signatures whose kernel choice a layer remembers (then it forgets them all and starts over).
_DISPATCH_CACHE_SIZE = 64


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
        grid: dict[str, Any] | None = None,
        solver: dict[str, Any] | None = None,
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
        #: What the weight came from (as in :class:`QuantizedWeight`): the original weight's dtype and the
        #: grid/solver configs that produced it (``{}`` when unknown).
        self.weight_dtype = dtype
        self.grid: dict[str, Any] = dict(grid or {})
        self.solver: dict[str, Any] = dict(solver or {})
        self.register_buffer("planes", torch.zeros(planes, out_features, in_features // 8, dtype=torch.uint8, device=device))
        self.register_buffer(
            "coeffs", torch.zeros(in_features // group_size, planes + 1, out_features, dtype=torch.float16, device=device)
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._kernel_cache: dict[str, Any] = {}
        self._dispatch: dict[tuple, Kernel] = {}

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
            grid=qweight.grid,
            solver=qweight.solver,
        )
        layer.weight_dtype = qweight.dtype
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
            dtype=self.weight_dtype,
            grid=dict(self.grid),
            solver=dict(self.solver),
        )

    # ---- compute --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension must be in_features={self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        return self.kernel_for(x2).forward(self, x2).reshape(*lead, self.out_features)

    def kernel_for(self, x2: torch.Tensor) -> Kernel:
        """The kernel that runs ``self(x2)`` (``x2``: ``[M, in]``), chosen once per input signature
        (kernel setting, device, dtype, M) and remembered until the layer moves or the registry changes."""
        key = (self.kernel, x2.device, x2.dtype, x2.shape[0], KERNELS.version)
        kernel = self._dispatch.get(key)
        if kernel is None:
            kernel = select_kernel(self.kernel, self, x2)
            if len(self._dispatch) >= _DISPATCH_CACHE_SIZE:
                self._dispatch.clear()
            self._dispatch[key] = kernel
        return kernel

    def set_kernel(self, kernel: str) -> None:
        self.kernel = check_kernel_name(kernel)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "QuantLinear":
        # Moving or casting the module invalidates kernel repacks and choices. Packed buffers keep their
        # dtypes: a floating-point cast (``.half()``, ``.to(torch.bfloat16)``) would round the fp16
        # coefficients, so then they are moved from the originals instead (``planes`` are uint8, which
        # module casts leave alone). A plain move copies each buffer once.
        self._kernel_cache = {}
        self._dispatch = {}
        coeffs = self.coeffs
        super()._apply(fn, *args, **kwargs)
        if self.coeffs.dtype != coeffs.dtype:
            moved = self.coeffs
            self.coeffs = (
                torch.empty_like(coeffs, device=moved.device) if coeffs.is_meta else coeffs.to(moved.device)
            )
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # Loading overwrites the packed buffers (in place, or replaces them with ``assign=True``): repacks
        # made from the old values are stale.
        self._kernel_cache = {}
        self._dispatch = {}
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def bits_per_weight(self) -> float:
        return bits_per_weight(self.k, self.group_size)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"planes={self.k}, group_size={self.group_size}, bpw={self.bits_per_weight:.3f}, kernel={self.kernel}"
        )
