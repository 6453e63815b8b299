"""GPTQ: the Hessian-aware column sweep with lazy block updates and per-group grid parameters.

Each group's parameters are the grid's initial coefficients (``grid.init``, fp16-rounded) of the group's
current, error-updated weights; over the ``bitplane`` grid they are its initial least-squares fit, never
refitted (that is what ``bpdq`` adds). Each column is snapped to its nearest level, its error
``(w - q) / U[t, t]`` is propagated to the rest of the block, and after a block its errors are propagated to
all later columns (``W[:, later] -= E_block @ U[block, later]``).
"""

from __future__ import annotations

import torch
from pydantic import Field

from bpdq.grids.base import Grid, round_coeffs
from bpdq.grids.bitplane import BitPlaneGrid
from bpdq.options import Options
from bpdq.quantized import SolveStats
from bpdq.registry import SOLVERS
from bpdq.solvers.base import Solver, given_factor, quadratic_forms, relative_loss
from bpdq.solvers.ordering import Order
from bpdq.solvers.refit import Refit, apply_refit
from bpdq.solvers.sweep import (
    SweepErrors, SweepFactor, block_width, prepare_layer, restore_order, sweep_factor, sweep_proxy_loss,
)


class GPTQOptions(Options):
    damp: float = Field(default=0.01, ge=0.0, le=10.0, description="damping, relative to mean(diag H)")
    block_size: int = Field(default=128, ge=8, le=65536, description="lazy-update block width (rounded to whole groups)")
    order: Order = Field(default=Order.GAR, description="column order: none | gar (group-aware reordering)")
    refit: Refit = Field(
        default=Refit.NONE,
        description="after the sweep: none | full (joint refit of the coefficients with the full Hessian; "
        "bitplane grid only, a uniform grid must keep uniform levels)",
    )


@SOLVERS.register("gptq")
class GPTQ(Solver):
    Options = GPTQOptions
    requires_hessian = True
    rows_independent = True  # per row: the grid's initial fit, the snaps, the error propagation; the refit

    def prefactor(self, hessian: torch.Tensor, group_size: int) -> SweepFactor:
        return sweep_factor(hessian.detach().to(torch.float32), group_size, self.options.order, self.options.damp)

    def _solve(self, W: torch.Tensor, H: torch.Tensor | None, grid: Grid, group_size: int) -> tuple[torch.Tensor, torch.Tensor, SolveStats]:
        assert H is not None  # Solver.__call__ enforces requires_hessian
        opts = self.options
        original = None
        if Refit(opts.refit) is Refit.FULL:
            if not isinstance(grid, BitPlaneGrid):
                raise ValueError(
                    f"solver 'gptq' with refit='full' needs the 'bitplane' grid (got {grid.name!r}): a refit "
                    "makes the levels non-uniform; use refit='none' with a uniform grid"
                )
            original = W.clone()
        # statistics: the refit's losses, else the sweep's errors and tr(W H W^T) (taken before the sweep
        # overwrites W, which layer.W may be), else (tiny damping, H not PSD) Solver.__call__'s explicit formula.
        # Without a refit, H is not needed once U exists: it is freed then where the caller allows it.
        reference = float(quadratic_forms(W, H).sum()) if original is None else None
        layer = prepare_layer(W, H, group_size, opts.order, opts.damp, factor=given_factor(), release=original is None)
        from_sweep = original is None and layer.loss_from_errors
        codes, coeffs, errors = gptq_sweep(layer.W, layer.U, grid, group_size, block_width(opts.block_size, group_size))
        codes, coeffs, _ = restore_order(codes, coeffs, layer.perm, group_size)
        coeffs, refit_extra, loss = apply_refit(opts.refit, original, H, codes, coeffs, grid.planes, group_size,
                                                shift=layer.refit_shift())
        stats = SolveStats(extra={**layer.extra(), "order": Order(opts.order).value, **refit_extra})
        if loss is not None:
            stats.proxy_loss, stats.relative_loss = loss
        elif from_sweep:
            assert reference is not None
            sweep_loss = sweep_proxy_loss(layer, errors)
            stats.proxy_loss, stats.relative_loss = sweep_loss, relative_loss(sweep_loss, reference)
        return codes, coeffs, stats


def gptq_sweep(
    W: torch.Tensor, U: torch.Tensor, grid: Grid, group_size: int, block: int
) -> tuple[torch.Tensor, torch.Tensor, SweepErrors]:
    """GPTQ over ``W`` (modified in place) in sweep order: ``(codes uint8 [out, in], coeffs [out, groups, k+1],
    errors)``; ``errors`` gives the proxy loss without another pass over ``H`` (:func:`sweep_proxy_loss`)."""
    if block <= 0 or block % group_size:
        raise ValueError(f"block ({block}) must be a positive multiple of group_size ({group_size})")
    out, inp = W.shape
    original = W.clone()
    scaled = torch.empty(inp, dtype=torch.float64, device=W.device)
    residual = torch.empty(inp, dtype=torch.float64, device=W.device)
    codes = torch.empty(out, inp, dtype=torch.uint8, device=W.device)  # codes < 2^k <= 256
    coeffs = torch.empty(out, inp // group_size, grid.planes + 1, dtype=W.dtype, device=W.device)
    for i1 in range(0, inp, block):
        i2 = min(i1 + block, inp)
        W1 = W[:, i1:i2]
        E1 = torch.empty_like(W1)
        for j in range(i2 - i1):
            col = i1 + j
            if col % group_size == 0:
                gc = round_coeffs(grid.init(W[:, col : col + group_size]))
                coeffs[:, col // group_size] = gc
            w = W1[:, j : j + 1]
            code = grid.snap(w, gc)
            q = grid.dequant(code, gc)
            err = (w - q).squeeze(1) / U[col, col]
            W1[:, j + 1 :].addr_(err, U[col, col + 1 : i2], alpha=-1.0)
            E1[:, j] = err
            codes[:, col] = code.squeeze(1)
        # the block's columns are final now: q = w - err * U[t, t]
        R1 = original[:, i1:i2] - W1 + E1 * torch.diagonal(U)[i1:i2]
        scaled[i1:i2] = torch.linalg.vecdot(E1, E1, dim=0)
        residual[i1:i2] = torch.linalg.vecdot(R1, R1, dim=0)
        if i2 < inp:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)
    return codes, coeffs, SweepErrors(scaled, residual)
