"""Literal, unoptimised BPDQ: the method's steps one by one, the reference the product solver must match.

Slow and obviously right: every column update is applied to the whole rest of the block, the delta
correction is applied as written, every iteration restarts from a copy of the block at group entry, and
the nearest level is an argmin over distances (lowest code on ties). Coefficients are fp16-rounded before
their values are used, as the product does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bpdq.grids.base import round_coeffs
from bpdq.grids.bitplane import BitPlaneGrid


@dataclass
class GroupTrace:
    """Bookkeeping of one group, for the delta-correction test (sweep order, block-local columns)."""

    block: tuple[int, int]  # block columns [i1, i2)
    start: int  # group start, block-local
    entry: torch.Tensor  # block weights at group entry [out, block]
    errors: torch.Tensor  # kept final errors E [out, g]
    after: torch.Tensor  # block weights after the group [out, block]
    scores: list[float] = field(default_factory=list)  # ||E||^2 per iteration


@dataclass
class OracleResult:
    codes: torch.Tensor  # [out, in], original column order
    coeffs: torch.Tensor  # [out, groups, k+1], original group order
    best_iters: list[int]  # original group order, 1-based
    perm: torch.Tensor
    U: torch.Tensor
    W: torch.Tensor  # weights after step 1-2 (sweep order)
    errors: torch.Tensor  # final errors in sweep order [out, in]
    traces: list[GroupTrace]


def oracle_bpdq(W, H, grid: BitPlaneGrid, group_size: int, *, iters=10, alpha=1e-4, damp=0.01, order="gar", block=128):
    W = W.clone()
    H = H.clone()
    out, n = W.shape
    g = group_size
    # 1. dead inputs
    for j in range(n):
        if H[j, j] == 0:
            H[j, j] = 1.0
            W[:, j] = 0.0
    # 2. group-aware reordering
    if order == "gar":
        groups = []
        for s in range(0, n, g):
            cols = sorted(range(s, s + g), key=lambda j: (-float(H[j, j]), j))
            groups.append(cols)
        groups.sort(key=lambda cols: -float(H[cols[0], cols[0]]))  # stable: ties keep group order
        perm = torch.tensor([j for cols in groups for j in cols])
    else:
        perm = torch.arange(n)
    W = W[:, perm]
    H = H[perm][:, perm]
    # U: upper Cholesky factor of the damped inverse Hessian
    Hd = H + damp * torch.diagonal(H).mean() * torch.eye(n, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    W_start = W.clone()
    codes = torch.zeros(out, n, dtype=torch.int64)
    coeffs = torch.zeros(out, n // g, grid.planes + 1, dtype=W.dtype)
    errors = torch.zeros_like(W)
    best_iters = [0] * (n // g)
    traces = []
    # 3. blocks, groups, iterations
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for s in range(0, i2 - i1, g):
            entry = W1.clone()
            U_loc = U1[s : s + g, s : s + g]
            whiten = torch.linalg.inv(U_loc).T
            w_entry = entry[:, s : s + g]
            planes = grid.init_codes(w_entry)
            c = round_coeffs(grid.fit(w_entry, planes, whiten=whiten, alpha=alpha))
            best = None
            trace_scores = []
            for it in range(1, iters + 1):
                Wc = entry.clone()
                E = torch.zeros(out, g, dtype=W.dtype)
                Q_old = torch.zeros(out, g, dtype=W.dtype)
                chosen = torch.zeros(out, g, dtype=torch.int64)
                levels = grid.levels(c)
                for t in range(g):
                    col = s + t
                    dist = (Wc[:, col : col + 1] - levels).abs()
                    code = dist.argmin(dim=1)
                    q = levels[torch.arange(out), code]
                    err = (Wc[:, col] - q) / U1[col, col]
                    Wc[:, col + 1 :] -= err[:, None] * U1[col, col + 1 :][None, :]
                    E[:, t] = err
                    Q_old[:, t] = q
                    chosen[:, t] = code
                new_c = round_coeffs(grid.fit(w_entry, chosen, whiten=whiten, alpha=alpha))
                Q_new = grid.dequant(chosen, new_c)
                dE = torch.linalg.solve_triangular(U_loc, Q_old - Q_new, upper=True, left=False)
                E = E + dE
                Wc[:, s : s + g] = Q_new
                Wc[:, s + g :] -= dE @ U1[s : s + g, s + g :]
                score = float((E**2).sum())
                trace_scores.append(score)
                # a relative improvement below 1e-12 is rounding noise between equal iterates (same planes,
                # same coefficients, errors summed in another order): the earlier iterate is kept
                if best is None or score < best[0] * (1 - 1e-12):
                    best = (score, chosen, new_c, E, Wc.clone(), it)
                c = new_c
            _, chosen, new_c, E, Wc, it = best
            W1 = Wc
            E1[:, s : s + g] = E
            grp = (i1 + s) // g
            codes[:, i1 + s : i1 + s + g] = chosen
            coeffs[:, grp] = new_c
            best_iters[grp] = it
            traces.append(GroupTrace((i1, i2), s, entry, E, Wc.clone(), trace_scores))
        W[:, i1:i2] = W1
        errors[:, i1:i2] = E1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    # 4. undo the reordering
    codes_orig = torch.zeros_like(codes)
    codes_orig[:, perm] = codes
    coeffs_orig = torch.zeros_like(coeffs)
    best_orig = [0] * (n // g)
    for j in range(n // g):
        orig = int(perm[j * g]) // g
        coeffs_orig[:, orig] = coeffs[:, j]
        best_orig[orig] = best_iters[j]
    return OracleResult(codes_orig, coeffs_orig, best_orig, perm, U, W_start, errors, traces)
