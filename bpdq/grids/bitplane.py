"""Bit-plane variable grid (BPDQ): k bit-planes with free real coefficients per row per group.

Initialisation (the first two steps of BPDQ's per-group solve, :mod:`bpdq.solvers.bpdq`): quantize the group
with an ``init_bits``-bit asymmetric uniform grid, keep the top k bit-planes of its codes, and fit the k+1
coefficients by (optionally whitened) ridge least squares.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from bpdq.grids.base import Grid
from bpdq.grids.uniform import UniformGrid
from bpdq.options import Options
from bpdq.registry import GRIDS


class BitPlaneOptions(Options):
    planes: int = Field(default=2, ge=1, le=8, description="number of bit-planes k (2^k levels), 1..8")
    init_bits: int = Field(default=8, ge=1, le=8, description="bits of the uniform grid the planes start from")

    @model_validator(mode="after")
    def _init_bits_cover_planes(self) -> "BitPlaneOptions":
        if self.init_bits < self.planes:
            raise ValueError(f"init_bits ({self.init_bits}) must be >= planes ({self.planes})")
        return self


@GRIDS.register("bitplane")
class BitPlaneGrid(Grid):
    """Variable grid: levels ``c_0 + sum_i c_i b_i`` with real, freely fitted coefficients."""

    Options = BitPlaneOptions

    @property
    def planes(self) -> int:
        return self.options.planes

    def init_codes(self, w: torch.Tensor) -> torch.Tensor:
        """Top-k planes of an ``init_bits`` asymmetric uniform quantization, as codes in [0, 2^k)."""
        self._check_rows(w, "w")
        fine = UniformGrid(bits=self.options.init_bits)
        codes = fine.snap(w, fine.init(w))
        return codes >> (self.options.init_bits - self.planes)

    def init_fit(self, w: torch.Tensor, *, whiten: torch.Tensor | None = None, alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial ``(codes, coeffs)``: top-k planes and their (whitened) least-squares coefficients."""
        codes = self.init_codes(w)
        return codes, self.fit(w, codes, whiten=whiten, alpha=alpha)

    def _init(self, w: torch.Tensor) -> torch.Tensor:
        return self.init_fit(w)[1]
