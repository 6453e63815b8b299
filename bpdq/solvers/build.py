"""Grids and solvers from their specs, and quantizing one weight:
``quantize_weight(weight, hessian, grid=..., solver=..., group_size=...)``."""

from __future__ import annotations

from typing import Any

import torch

from bpdq.grids.base import Grid
from bpdq.options import build
from bpdq.quantized import QuantizedWeight
from bpdq.registry import GRIDS, SOLVERS
from bpdq.solvers.base import Solver


def build_grid(spec: Any) -> Grid:
    """A grid from a registered name, a ``{"type": name, **options}`` dict, or a Grid instance."""
    return build(GRIDS, spec, Grid, "grid")


def build_solver(spec: Any) -> Solver:
    """A solver from a registered name, a ``{"type": name, **options}`` dict, or a Solver instance."""
    return build(SOLVERS, spec, Solver, "solver")


def quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor | None = None,
    *,
    grid: Any,
    solver: Any = "rtn",
    group_size: int,
    release_hessian: bool = False,
    factor: Any = None,
    row_gather: Any = None,
) -> QuantizedWeight:
    """Quantize one ``[out, in]`` weight; ``hessian`` is ``[in, in]`` (``None`` for Hessian-free solvers).
    ``release_hessian=True``: ``hessian`` is not read again, and the solver may free its memory (leaving it
    empty) as soon as it no longer needs it, which lowers the solve's peak memory by one ``[in, in]`` matrix.
    ``factor``: the solver's :meth:`~bpdq.solvers.base.Solver.prefactor` of ``hessian``, made ahead;
    ``row_gather``: ``weight`` is rows of a larger weight solved elsewhere too (see ``Solver.__call__``).

    >>> qw = quantize_weight(torch.randn(16, 64), grid={"type": "bitplane", "planes": 2}, solver="rtn",
    ...                      group_size=32)
    >>> qw.dequantize().shape
    torch.Size([16, 64])
    """
    g = build_grid(grid)
    s = build_solver(solver)
    return s(weight, hessian, g, group_size, release_hessian=release_hessian, factor=factor,
             row_gather=row_gather)
