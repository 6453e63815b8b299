"""Quantization grids. ``bpdq.GRIDS`` lists them by name."""

from bpdq.grids.base import COEFF_DTYPE, Grid, ridge_lstsq, round_coeffs
from bpdq.grids.bitplane import BitPlaneGrid, BitPlaneOptions
from bpdq.grids.uniform import UniformGrid, UniformOptions

__all__ = [
    "COEFF_DTYPE",
    "BitPlaneGrid",
    "BitPlaneOptions",
    "Grid",
    "UniformGrid",
    "UniformOptions",
    "ridge_lstsq",
    "round_coeffs",
]
