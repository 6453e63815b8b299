"""Uniform (affine) grid: 2^bits evenly spaced levels per row per group, asymmetric by default.

As bit-planes: ``c_i = s * 2^(i-1)`` and ``c_0 = -s * z`` — the special case of the bit-plane grid.
The scale and the offset ``-s*z`` are rounded to fp16 (their storage precision) before codes are chosen,
so the planes + coefficients form dequantizes to exactly ``s*q + c_0`` (every partial sum is exact in fp32).
"""

from __future__ import annotations

import torch
from pydantic import Field

from bpdq.grids.base import Grid, ridge_lstsq, round_coeffs
from bpdq.options import Options
from bpdq.registry import GRIDS


class UniformOptions(Options):
    bits: int = Field(default=4, ge=1, le=8, description="bits per weight (2^bits levels), 1..8")
    symmetric: bool = Field(default=False, description="zero point fixed at the middle code")


@GRIDS.register("uniform")
class UniformGrid(Grid):
    """Min-max affine grid (RTN/GPTQ style)."""

    Options = UniformOptions

    @property
    def planes(self) -> int:
        return self.options.bits

    def coeffs_from_scale(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``[rows]`` scale and zero point -> bit-plane coefficients ``[rows, k+1]``."""
        powers = 2.0 ** torch.arange(self.planes, dtype=scale.dtype, device=scale.device)
        return torch.cat([scale.unsqueeze(1) * powers, (-scale * zero).unsqueeze(1)], dim=1)

    def scale_zero(self, coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`coeffs_from_scale` (zero point may be fractional after a refit)."""
        scale = coeffs[:, 0]
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, -coeffs[:, -1] / safe

    def _init(self, w: torch.Tensor) -> torch.Tensor:
        maxq = 2**self.planes - 1
        if self.options.symmetric:
            amax = w.abs().amax(dim=1)
            scale = round_coeffs(2 * amax / maxq)
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            zero = torch.full_like(scale, float((maxq + 1) // 2))
        else:
            lo = w.amin(dim=1).clamp(max=0)
            hi = w.amax(dim=1).clamp(min=0)
            # a range below fp16 resolution rounds to scale 0: use 1 (all values then snap to about 0)
            scale = round_coeffs((hi - lo) / maxq)
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            zero = torch.round(-lo / scale).clamp(0, maxq)
        # the offset -s*z is rounded to fp16 too: the grid's levels are exactly what storage holds
        return round_coeffs(self.coeffs_from_scale(scale, zero))

    def _snap(self, w: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        # coefficients of this grid are always in uniform form (init and fit keep them so)
        scale, zero = self.scale_zero(coeffs)
        q = torch.round(w / scale.unsqueeze(1) + zero.unsqueeze(1))
        return q.clamp(0, 2**self.planes - 1).long()

    def _fit(self, w: torch.Tensor, codes: torch.Tensor, whiten: torch.Tensor | None, alpha: float) -> torch.Tensor:
        """Refit scale and offset (2 parameters) for fixed codes; stays a uniform grid."""
        design = torch.stack([codes.to(w.dtype), torch.ones_like(w)], dim=-1)
        sol = ridge_lstsq(design, w, whiten, alpha)
        powers = 2.0 ** torch.arange(self.planes, dtype=w.dtype, device=w.device)
        return torch.cat([sol[:, :1] * powers, sol[:, 1:]], dim=1)
