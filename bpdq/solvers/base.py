"""The Solver interface: a pure function of tensors ``(W, H, grid, group_size) -> QuantizedWeight``.

``Solver.__call__`` validates inputs (shapes, finiteness, group size) and times the solve; subclasses
implement ``_solve`` on a float32 copy of the weight. Hooks, layer walking and I/O live elsewhere.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod

import torch

from bpdq.grids.base import Grid
from bpdq.options import Configurable
from bpdq.quantized import QuantizedWeight, SolveStats
from bpdq.solvers.hessian import check_hessian


class Solver(Configurable, ABC):
    """Abstract solver. ``requires_hessian`` solvers raise if called without one."""

    requires_hessian: bool = False

    def __call__(
        self, weight: torch.Tensor, hessian: torch.Tensor | None, grid: Grid, group_size: int
    ) -> QuantizedWeight:
        check_weight(weight, group_size)
        if not isinstance(grid, Grid):
            raise TypeError(f"grid must be a Grid instance, got {type(grid).__name__}")
        if hessian is not None:
            if not isinstance(hessian, torch.Tensor):
                raise TypeError(f"hessian must be a torch.Tensor or None, got {type(hessian).__name__}")
            check_hessian(hessian, weight.shape[1])
        elif self.requires_hessian:
            raise ValueError(f"solver {self.name!r} needs a Hessian (calibration data); use 'rtn' without one")
        W = weight.detach().to(torch.float32).clone()
        H = hessian.detach().to(torch.float32) if hessian is not None else None
        start = time.perf_counter()
        codes, coeffs, stats = self._solve(W, H, grid, group_size)
        elapsed = time.perf_counter() - start
        qw = QuantizedWeight.from_codes(
            codes,
            coeffs,
            planes=grid.planes,
            group_size=group_size,
            dtype=weight.dtype,
            grid=grid.to_config(),
            solver=self.to_config(),
            stats=stats,
        )
        qw.stats.time_s = elapsed
        if H is not None and qw.stats.proxy_loss is None:
            qw.stats.proxy_loss, qw.stats.relative_loss = proxy_loss(weight.detach().to(torch.float32), qw.dequantize(torch.float32), H)
        return qw

    @abstractmethod
    def _solve(
        self, W: torch.Tensor, H: torch.Tensor | None, grid: Grid, group_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, SolveStats]:
        """Return ``(codes int[out, in], coeffs float[out, groups, k+1], stats)`` in original column order."""


def proxy_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """``tr((W-Q) H (W-Q)^T)`` and its ratio to ``tr(W H W^T)``: one ``[2*out, in] x [in, in]`` matmul in
    float32 (the solve's precision; float64 doubled the cost), row sums accumulated in float64."""
    out = W.shape[0]
    W32 = W.to(torch.float32)
    X = torch.cat([W32 - Q.to(torch.float32), W32])
    terms = ((X @ H.to(torch.float32)) * X).sum(1, dtype=torch.float64)
    loss, ref = max(float(terms[:out].sum()), 0.0), float(terms[out:].sum())
    return loss, (loss / ref if ref > 0 else math.inf if loss > 0 else 0.0)


def check_weight(weight: object, group_size: object) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"weight is empty: shape {tuple(weight.shape)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    inp = weight.shape[1]
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"group_size must be a positive multiple of 8 (e.g. 32, 64, 128), got {group_size}")
    if inp % group_size:
        divisors = [g for g in range(8, inp + 1, 8) if inp % g == 0]
        raise ValueError(
            f"in_features {inp} is not divisible by group_size {group_size}; allowed group sizes for this "
            f"layer: {divisors}"
        )
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf values; all entries must be finite")


def group_rows(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out * groups, group_size]`` (each row of the result is one row of one group)."""
    out, inp = W.shape
    return W.reshape(out * (inp // group_size), group_size)
