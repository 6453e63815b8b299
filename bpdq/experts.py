"""QuantExperts: the quantized replacement of a mixture-of-experts block's fused experts.

transformers 5.x holds the experts of Qwen3-MoE, Qwen2-MoE and Mixtral as two 3-D parameters,
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, and calls the module as
``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``. :class:`QuantExperts` keeps the same call
and holds, per projection, the :class:`~bpdq.linear.QuantLinear` buffers of every expert stacked on a leading
expert axis (docs/format.md): ``gate_up_planes uint8[E, k, 2I, H/8]``, ``gate_up_coeffs float16[E, H/g, k+1,
2I]``, ``down_planes uint8[E, k, H, I/8]``, ``down_coeffs float16[E, I/g, k+1, H]``. Each projection has one
number of planes and one group size for all its experts. The forward runs only the experts some token is
routed to, each through the kernel registry (``kernel="auto"`` by default) on a per-expert view of the
buffers, exactly as a QuantLinear with that expert's planes and coefficients would.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from bpdq.kernels.base import Kernel, check_kernel_name, select_kernel
from bpdq.quantized import QuantizedWeight, bits_per_weight, check_group_size

#: The two projections of a fused experts module, in the order they run.
PROJECTIONS: tuple[str, ...] = ("gate_up_proj", "down_proj")


def buffer_prefix(projection: str) -> str:
    """``gate_up_proj`` -> ``gate_up``: the buffers of ``projection`` are ``<prefix>_planes`` and ``<prefix>_coeffs``."""
    return projection.removesuffix("_proj")


class ExpertView:
    """One expert's projection as a kernel sees a layer (the ``PackedLinear`` protocol): views of the stacked
    buffers, no bias, and its own kernel cache."""

    bias = None

    def __init__(self, planes: torch.Tensor, coeffs: torch.Tensor, group_size: int) -> None:
        self.k, self.out_features, packed = planes.shape
        self.in_features = packed * 8
        self.group_size = group_size
        self.planes = planes
        self.coeffs = coeffs
        self._kernel_cache: dict[str, Any] = {}


class QuantExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        projections: dict[str, dict[str, Any]],
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        dtype: torch.dtype = torch.float32,
        kernel: str = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        """``projections`` maps ``gate_up_proj`` and ``down_proj`` to ``{"planes": k, "group_size": g}``
        (plus optional ``grid`` and ``solver`` configs, kept as metadata)."""
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if set(projections) != set(PROJECTIONS):
            raise ValueError(f"projections must name exactly {list(PROJECTIONS)}, got {sorted(projections)}")
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.act_fn = act_fn
        self.kernel = check_kernel_name(kernel)
        self.weight_dtype = dtype
        self.meta: dict[str, dict[str, Any]] = {}
        shapes = {"gate_up_proj": (2 * intermediate_size, hidden_size), "down_proj": (hidden_size, intermediate_size)}
        for name in PROJECTIONS:
            entry = projections[name]
            k, g = entry.get("planes"), entry.get("group_size")
            if not isinstance(k, int) or not 1 <= k <= 8:
                raise ValueError(f"{name}: planes must be an int in 1..8, got {k!r}")
            out, inp = shapes[name]
            check_group_size(g, inp)
            self.meta[name] = {"planes": k, "group_size": g, "grid": dict(entry.get("grid") or {}),
                               "solver": dict(entry.get("solver") or {})}
            prefix = buffer_prefix(name)
            self.register_buffer(f"{prefix}_planes",
                                 torch.zeros(num_experts, k, out, inp // 8, dtype=torch.uint8, device=device))
            self.register_buffer(f"{prefix}_coeffs",
                                 torch.zeros(num_experts, inp // g, k + 1, out, dtype=torch.float16, device=device))
        self._views: dict[tuple[str, int], ExpertView] = {}
        self._dispatch: dict[tuple, Kernel] = {}

    # ---- construction ---------------------------------------------------------------------------------

    @classmethod
    def like(cls, experts: nn.Module, projections: dict[str, dict[str, Any]], *, kernel: str = "auto") -> "QuantExperts":
        """An empty QuantExperts of the shape of a transformers experts module (on its parameters' device)."""
        gate_up = experts.gate_up_proj
        num, two_i, hidden = gate_up.shape
        return cls(num, hidden, two_i // 2, projections=projections, act_fn=experts.act_fn, dtype=gate_up.dtype,
                   kernel=kernel, device=gate_up.device)

    def set_expert(self, projection: str, index: int, qweight: QuantizedWeight) -> None:
        """Store expert ``index``'s quantized ``projection`` (its shape, planes and group size must match)."""
        planes, coeffs = self.packed(projection)
        meta = self.meta[projection]
        if tuple(qweight.planes.shape) != tuple(planes.shape[1:]) or qweight.group_size != meta["group_size"]:
            raise ValueError(f"{projection}[{index}]: quantized weight has planes {tuple(qweight.planes.shape)} and "
                             f"group size {qweight.group_size}, the module holds {tuple(planes.shape[1:])} and "
                             f"{meta['group_size']}")
        planes[index].copy_(qweight.planes)
        coeffs[index].copy_(qweight.coeffs)
        meta["grid"], meta["solver"] = dict(qweight.grid), dict(qweight.solver)
        self._views.pop((projection, index), None)

    def packed(self, projection: str) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = buffer_prefix(projection)
        return getattr(self, f"{prefix}_planes"), getattr(self, f"{prefix}_coeffs")

    def quantized_weight(self, projection: str, index: int) -> QuantizedWeight:
        """Expert ``index``'s ``projection`` as a :class:`QuantizedWeight` (sharing the buffers)."""
        planes, coeffs = self.packed(projection)
        meta = self.meta[projection]
        return QuantizedWeight(planes=planes[index], coeffs=coeffs[index], group_size=meta["group_size"],
                               shape=(planes.shape[2], planes.shape[3] * 8), dtype=self.weight_dtype,
                               grid=dict(meta["grid"]), solver=dict(meta["solver"]))

    def view(self, projection: str, index: int) -> ExpertView:
        key = (projection, index)
        view = self._views.get(key)
        if view is None:
            planes, coeffs = self.packed(projection)
            view = self._views[key] = ExpertView(planes[index], coeffs[index], self.meta[projection]["group_size"])
        return view

    # ---- compute --------------------------------------------------------------------------------------

    def _linear(self, projection: str, index: int, x: torch.Tensor) -> torch.Tensor:
        view = self.view(projection, index)
        key = (projection, self.kernel, x.device, x.dtype, x.shape[0])
        kernel = self._dispatch.get(key)
        if kernel is None:
            kernel = self._dispatch[key] = select_kernel(self.kernel, view, x)
        return kernel.forward(view, x)

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``index`` applied to ``x [T, H]`` (no routing weight)."""
        gate, up = self._linear("gate_up_proj", index, x).chunk(2, dim=-1)
        return self._linear("down_proj", index, self.act_fn(gate) * up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[-1] != self.hidden_dim:
            raise ValueError(f"hidden_states must end in hidden_size={self.hidden_dim}, got {tuple(hidden_states.shape)}")
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:
                continue
            token, slot = torch.where(top_k_index == e)
            y = self.expert(e, hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def set_kernel(self, kernel: str) -> None:
        self.kernel = check_kernel_name(kernel)
        self._dispatch = {}

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "QuantExperts":
        # As QuantLinear's: moves invalidate views and kernel choices; the fp16 coefficients keep their dtype.
        self._views, self._dispatch = {}, {}
        kept = {name: getattr(self, f"{buffer_prefix(name)}_coeffs") for name in PROJECTIONS}
        super()._apply(fn, *args, **kwargs)
        for name, coeffs in kept.items():
            attr = f"{buffer_prefix(name)}_coeffs"
            moved = getattr(self, attr)
            if moved.dtype != coeffs.dtype:
                setattr(self, attr, torch.empty_like(coeffs, device=moved.device) if coeffs.is_meta
                        else coeffs.to(moved.device))
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._views, self._dispatch = {}, {}
        super()._load_from_state_dict(*args, **kwargs)

    def bits_per_weight(self, projection: str) -> float:
        meta = self.meta[projection]
        return bits_per_weight(meta["planes"], meta["group_size"])

    def extra_repr(self) -> str:
        parts = [f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}"]
        parts += [f"{name}: planes={m['planes']}, group_size={m['group_size']}" for name, m in self.meta.items()]
        return ", ".join(parts) + f", kernel={self.kernel}"
