"""BPDQ: bit-plane decomposition quantization on a variable grid.

For every group of ``g`` columns (in sweep order, inside lazy-update blocks; docs/method.md, "The solver"):

a. initial planes: top k bit-planes of an ``init_bits`` uniform quantization of the group's current weights;
b. coefficients: ridge least squares in the metric whitened by ``U_loc^-T`` (``U_loc`` = the group's block of
   the inverse-Hessian Cholesky factor ``U``), fp16-rounded;
c. ``iters`` times, from the group's entry weights: a GPTQ column sweep over all 2^k levels, a refit of the
   coefficients for the chosen planes, and the delta correction that makes the errors consistent with the
   refitted values. The final errors of an iterate are ``E = (W_entry - Q_new) U_loc^-1`` (= sweep errors +
   ``dE``); the iterate with the smallest ``||E||^2`` over the group is kept;
d. the kept errors are propagated to the rest of the block once per group, and to later blocks once per block.

The score is taken over the whole group (all rows), so ``stats.best_iters`` has one kept iteration (1-based)
per group, in original group order; ``stats.extra`` records ``damp`` (after retries), ``cholesky_retries``,
``dead_inputs``, ``order`` and ``iters_run`` (fewer than ``iters`` only with ``tol``).

Speed: per column only the group's own columns are updated (the block tail is updated once per group with a
matmul, which equals the literal per-column + delta-correction updates), levels are snapped by a
sorted-threshold search, a refit only solves the rows whose planes changed, and the work buffers are
reused. The literal step-by-step version lives in the
test suite (``tests/solvers/oracle.py``) and the tests check both give the same planes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from pydantic import Field

from bpdq.grids.base import Grid, round_coeffs
from bpdq.grids.bitplane import BitPlaneGrid
from bpdq.options import Options
from bpdq.quantized import SolveStats
from bpdq.registry import SOLVERS
from bpdq.solvers.base import Solver, given_factor, given_row_gather
from bpdq.solvers.fit import WhitenedFit
from bpdq.solvers.ordering import Order
from bpdq.solvers.refit import Refit, apply_refit
from bpdq.solvers.sweep import SweepFactor, block_width, prepare_layer, restore_order, sweep_factor


class BPDQOptions(Options):
    iters: int = Field(default=10, ge=1, le=1000, description="sweep/refit iterations per group")
    alpha: float = Field(default=1e-4, ge=0.0, le=1.0, description="ridge weight (relative) of the coefficient fit")
    damp: float = Field(default=0.01, ge=0.0, le=10.0, description="damping, relative to mean(diag H)")
    order: Order = Field(default=Order.GAR, description="column order: none | gar (group-aware reordering)")
    block_size: int = Field(default=128, ge=8, le=65536, description="lazy-update block width (rounded to whole groups)")
    init_bits: int | None = Field(
        default=None, ge=1, le=8, description="bits of the uniform quantization the planes start from (default: the grid's, 8)"
    )
    tol: float | None = Field(
        default=None,
        ge=0.0,
        description="optional early stop: end a group's iterations when its best score improves by less than "
        "this fraction (off by default; real layers still improve ~0.3% between iterations 6 and 10)",
    )
    refit: Refit = Field(
        default=Refit.FULL,
        description="after the sweep: full (refit every row's coefficients jointly over its groups with the "
        "layer's full Hessian, planes frozen; never raises the proxy loss) | none (the paper's algorithm)",
    )


@dataclass
class BPDQSweep:
    """Result of :func:`bpdq_sweep`, in sweep order."""

    codes: torch.Tensor  # uint8 [out, in]
    coeffs: torch.Tensor  # [out, groups, k+1], fp16-representable
    best_iters: list[int]  # per group, 1-based
    iters_run: list[int]  # per group
    scores: list[float] = field(default_factory=list)  # per group, ||E||^2 of the kept iterate


@SOLVERS.register("bpdq")
class BPDQ(Solver):
    Options = BPDQOptions
    requires_hessian = True
    rows_independent = False  # each group keeps the iterate with the smallest error summed over all rows
    rows_gathered = True  # ... which a block of rows gets from the others (each iterate's error per row)

    def check_grid(self, grid: Grid, group_size: int) -> None:
        check_bitplane_grid(grid, self.options.init_bits)

    def prefactor(self, hessian: torch.Tensor, group_size: int) -> SweepFactor:
        return sweep_factor(hessian.detach().to(torch.float32), group_size, self.options.order, self.options.damp)

    def _solve(self, W: torch.Tensor, H: torch.Tensor | None, grid: Grid, group_size: int) -> tuple[torch.Tensor, torch.Tensor, SolveStats]:
        assert H is not None  # Solver.__call__ enforces requires_hessian
        init_grid = check_bitplane_grid(grid, self.options.init_bits)
        opts = self.options
        layer = prepare_layer(W, H, group_size, opts.order, opts.damp, factor=given_factor())
        # the refit's target: W itself unless the sweep overwrites it (no permutation and no dead input)
        original = None if Refit(opts.refit) is Refit.NONE else W.clone() if layer.W.data_ptr() == W.data_ptr() else W
        res = bpdq_sweep(
            layer.W, layer.U, init_grid, group_size,
            iters=opts.iters, alpha=opts.alpha, block=block_width(opts.block_size, group_size), tol=opts.tol,
            gather=given_row_gather(),
        )
        codes, coeffs, group_of = restore_order(res.codes, res.coeffs, layer.perm, group_size)
        layer_extra, best_iters, iters_run, shift = layer.extra(), res.best_iters, res.iters_run, layer.refit_shift()
        del layer, res  # U and the sweep-order weight and codes: the refit needs none of them
        coeffs, refit_extra, loss = apply_refit(opts.refit, original, H, codes, coeffs, grid.planes, group_size,
                                                shift=shift)
        best = [0] * len(group_of)
        run = [0] * len(group_of)
        for j, orig in enumerate(group_of):
            best[orig], run[orig] = best_iters[j], iters_run[j]
        extra = {**layer_extra, "order": Order(opts.order).value, "iters_run": run, **refit_extra}
        stats = SolveStats(best_iters=best, extra=extra)
        if loss is not None:  # the refit's losses; without a refit Solver.__call__ computes them
            stats.proxy_loss, stats.relative_loss = loss
        return codes, coeffs, stats


def check_bitplane_grid(grid: Grid, init_bits: int | None) -> BitPlaneGrid:
    """The bit-plane grid to start from (with the solver's ``init_bits`` if given); other grids are an error."""
    if not isinstance(grid, BitPlaneGrid):
        raise ValueError(
            f"solver 'bpdq' works on the 'bitplane' grid only, got grid {grid.name!r}; "
            "use solver 'gptq' for a uniform grid"
        )
    if init_bits is None or init_bits == grid.options.init_bits:
        return grid
    if init_bits < grid.planes:
        raise ValueError(f"init_bits ({init_bits}) must be >= the grid's planes ({grid.planes})")
    return BitPlaneGrid(planes=grid.planes, init_bits=init_bits)


def bpdq_sweep(
    W: torch.Tensor,
    U: torch.Tensor,
    grid: BitPlaneGrid,
    group_size: int,
    *,
    iters: int = 10,
    alpha: float = 1e-4,
    block: int = 128,
    tol: float | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> BPDQSweep:
    """BPDQ over ``W [out, in]`` (modified in place) with ``U`` (upper, ``H^-1 = U^T U``), both in sweep order.
    ``gather``: ``W`` is a block of rows of a larger weight solved elsewhere at the same time; each iterate's
    score (float32 squared errors summed per row, then over the rows in float64) takes every row's from it
    (see :func:`~bpdq.solvers.base.given_row_gather`)."""
    if block <= 0 or block % group_size:
        raise ValueError(f"block ({block}) must be a positive multiple of group_size ({group_size})")
    out, inp = W.shape
    g = group_size
    codes = torch.empty(out, inp, dtype=torch.uint8, device=W.device)  # codes < 2^k <= 256
    coeffs = torch.empty(out, inp // g, grid.planes + 1, dtype=W.dtype, device=W.device)
    best_iters: list[int] = []
    iters_run: list[int] = []
    scores: list[float] = []
    sweeper = _GroupSweeper(out, g, W.dtype, W.device)
    for i1 in range(0, inp, block):
        i2 = min(i1 + block, inp)
        E1 = torch.empty(out, i2 - i1, dtype=W.dtype, device=W.device)
        for s in range(i1, i2, g):
            e = s + g
            res = sweeper.solve(W[:, s:e], U[s:e, s:e], grid, iters=iters, alpha=alpha, tol=tol, gather=gather)
            codes[:, s:e] = res.codes
            coeffs[:, s // g] = res.coeffs
            E1[:, s - i1 : e - i1] = res.errors
            W[:, s:e] = res.values
            if e < i2:
                W[:, e:i2].addmm_(res.errors, U[s:e, e:i2], alpha=-1.0)
            best_iters.append(res.best_iter)
            iters_run.append(res.iters_run)
            scores.append(res.score)
        if i2 < inp:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)
    return BPDQSweep(codes, coeffs, best_iters, iters_run, scores)


@dataclass
class _GroupResult:
    codes: torch.Tensor
    coeffs: torch.Tensor
    values: torch.Tensor
    errors: torch.Tensor
    score: float
    best_iter: int
    iters_run: int


class _GroupSweeper:
    """Steps a-c for one group, reusing its work buffer (and the views into it) across groups."""

    def __init__(self, out: int, g: int, dtype: torch.dtype, device: torch.device) -> None:
        self.work = torch.empty(g, out, dtype=dtype, device=device)  # transposed: column t is a contiguous row
        self.cols = [self.work[t].unsqueeze(1) for t in range(g)]  # [out, 1] views
        self.tails = [self.work[t + 1 :] for t in range(g)]  # the columns right of t, inside the group
        self.eye = torch.eye(g, dtype=dtype, device=device)

    def solve(
        self, Wg: torch.Tensor, Ug: torch.Tensor, grid: BitPlaneGrid, *, iters: int, alpha: float, tol: float | None,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> _GroupResult:
        g = Ug.shape[0]
        entry = Wg.clone()
        entry_t = entry.T.contiguous()
        Uinv = torch.linalg.solve_triangular(Ug, self.eye, upper=True)
        fit = WhitenedFit(entry, Uinv.T, alpha, grid.planes)
        codes = grid.init_codes(entry)
        coeffs = round_coeffs(fit(codes))
        diag = Ug.diagonal().tolist()
        urows = [Ug[t, t + 1 :] for t in range(g)]
        best: _GroupResult | None = None
        it = 0
        for it in range(1, iters + 1):
            sorted_lv, canon, mids = level_thresholds(grid.levels(coeffs))
            self.work.copy_(entry_t)
            positions = []
            for t in range(g):
                x = self.cols[t]
                pos = (x > mids).sum(1, keepdim=True)  # nearest level's position among the sorted levels
                err = (x - sorted_lv.gather(1, pos)).div_(diag[t])
                if t + 1 < g:
                    self.tails[t].addr_(urows[t], err.view(-1), alpha=-1.0)
                positions.append(pos)
            new_codes = canon.gather(1, torch.cat(positions, dim=1))
            coeffs = _refit(fit, new_codes, codes, coeffs)
            codes = new_codes
            values = grid.dequant(codes, coeffs)
            errors = (entry - values) @ Uinv
            per_row = errors.pow(2).sum(dim=1)
            score = float((per_row if gather is None else gather(per_row)).sum(dtype=torch.float64))
            if best is None or score < best.score:
                prev = best.score if best is not None else None
                best = _GroupResult(codes, coeffs, values, errors, score, it, it)
                if tol is not None and prev is not None and prev - score <= tol * prev:
                    break
            elif tol is not None:
                break
        assert best is not None
        best.iters_run = it
        return best


def _refit(fit: WhitenedFit, codes: torch.Tensor, old_codes: torch.Tensor, old_coeffs: torch.Tensor) -> torch.Tensor:
    """fp16-rounded coefficients for ``codes``; rows whose codes did not change keep ``old_coeffs``."""
    changed = (codes != old_codes).any(dim=1).nonzero().squeeze(1)
    if changed.numel() == codes.shape[0]:
        return round_coeffs(fit(codes))
    coeffs = old_coeffs.clone()
    if changed.numel():
        coeffs[changed] = round_coeffs(fit(codes[changed], changed))
    return coeffs


def level_thresholds(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted levels, the code of each sorted position, and the midpoints between neighbours.

    A value's nearest level is at position ``(value > mids).sum()`` (ties go to the lower level). Among
    equal levels the lowest code is used, as an argmin over distances would choose.
    """
    sorted_lv, order = levels.sort(dim=1, stable=True)
    n = levels.shape[1]
    starts = torch.ones_like(order, dtype=torch.bool)
    starts[:, 1:] = sorted_lv[:, 1:] != sorted_lv[:, :-1]
    run_start = (torch.arange(n, device=levels.device) * starts).cummax(dim=1).values
    canon = order.gather(1, run_start)
    mids = ((sorted_lv[:, 1:] + sorted_lv[:, :-1]) * 0.5).contiguous()
    return sorted_lv, canon, mids
