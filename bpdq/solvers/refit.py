"""Joint refit of the coefficients with the layer's full Hessian (planes frozen).

The sweep fits each group's coefficients in its local whitened metric, one group at a time. With the planes
fixed, ``Q(c)`` is linear in all of a row's coefficients, so the layer's proxy loss

    tr((W - Q(c)) H (W - Q(c))^T) = sum_r (W_r - D_r c_r)^T H (W_r - D_r c_r)

splits into independent least-squares problems, one per output row, of size ``P = groups * (k+1)``. ``D_r``
is the row's design matrix: column ``(a, i)`` holds plane ``i``'s bits of group ``a`` (``i = k``: ones)
inside group ``a``'s columns and zeros elsewhere. With ``G_r = D_r^T H D_r`` and the old coefficients'
error ``E_r = W_r - D_r c_old``, the normal equations for the change ``d = c - c_old`` are

    (G_r + lam_r I) d = y_r,     y_r = D_r^T H E_r

a small ridge *towards the old coefficients* (``lam_r = ridge * mean(diag(G_r))``), so a direction the
calibration data does not determine (a plane that is empty in a group, a rank-deficient ``H``) keeps its old
value instead of making the system singular. The result is rounded to fp16 (the storage precision) and a row
keeps its old coefficients unless the rounded change ``d`` lowers its loss by ``d^T G_r d - 2 d^T y_r``
(computed in coefficient space, no second pass over ``H``) by more than :data:`MIN_GAIN` of the row's loss,
a margin far above the float32 rounding of ``G_r`` and ``y_r``: the layer's proxy loss does not go up.

Precision: products in float32 (``E H``, the Gram blocks), sums of losses in float64; the systems are
factored in float32 (Cholesky) and a row whose factorization fails, or whose float32 solution leaves a
residual above :data:`SOLVE_TOL` of ``|y_r|``, is solved again in float64. ``loss_before`` and
``reference`` agree with float64 quadratic forms to about 1e-6 relative, ``loss_after`` (the old loss plus
the gains) to about 1e-5 of ``loss_before``.

Cost per row: ``in^2`` multiply-adds for ``E_r H`` (which gives the old loss, ``y_r`` and, with ``G_r``, the
reference ``tr(W H W^T)``), ``k * in^2 / 2`` for the plane columns of ``G_r`` (built one column group at a
time over the blocks on and above the diagonal, batched over the chunk's rows; the ones columns' products
are shared by all rows: :func:`gram_matrices`) and a ``[P, P]`` float32 Cholesky. Rows are processed in
chunks sized from the memory free for the refit (:func:`memory_budget`: half the free device memory on a
GPU, a quarter of the available RAM up to 1 GiB on the CPU), so a wide layer runs over a hundred rows per
chunk, and the Python loop over column groups runs once per chunk. A row's result does not depend on its
chunk (:func:`row_chunks`), so the free memory never changes a checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum

import torch

from bpdq.quantized import COEFF_DTYPE, dequantize_bits
from bpdq.solvers.base import relative_loss
from bpdq.solvers.hessian import check_hessian

#: The ridge towards the old coefficients, relative to the mean diagonal of a row's normal equations.
RIDGE = 1e-6
#: Largest work budget (bytes) of a CPU refit: larger chunks do not make its matrix products faster.
CPU_BUDGET = 2**30
#: A row takes the refitted coefficients only if they lower its loss by more than this fraction of it.
MIN_GAIN = 1e-5
#: A float32 solution whose residual exceeds this fraction of ``|y|`` is solved again in float64.
SOLVE_TOL = 1e-3


class Refit(str, Enum):
    """Solver option: ``none`` keeps the sweep's coefficients, ``full`` refits them with the full Hessian."""

    NONE = "none"
    FULL = "full"


@dataclass
class RefitResult:
    """Refitted coefficients ``[out, groups, k+1]`` and what the refit changed."""

    coeffs: torch.Tensor
    loss_before: float  # tr((W-Q) H (W-Q)^T) with the old coefficients
    loss_after: float  # ... with the kept ones (<= loss_before)
    rows_improved: int  # rows that took the refitted coefficients
    rows: int
    reference: float  # tr(W H W^T) (float32 products, float64 sums), for the relative loss

    def to_dict(self) -> dict[str, float | int]:
        return {
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "rows_improved": self.rows_improved,
            "rows": self.rows,
        }


def memory_budget(device: torch.device) -> int:
    """Bytes the refit may use for its work buffers on ``device``: half the free memory of a GPU, else a
    quarter of the available RAM up to :data:`CPU_BUDGET`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    return int(min(CPU_BUDGET, _available_ram() // 4))


def _available_ram() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return CPU_BUDGET * 4


def row_bytes(inp: int, planes: int, group_size: int) -> int:
    """Work bytes of the refit per row of a chunk: the design, weight, error and ``E H`` rows and the Gram
    products (float32, ``in`` each), and three float32 ``[P, P]`` systems (Gram, damped copy, factor)."""
    p = planes + 1
    P = p * (inp // group_size)
    return 4 * inp * (3 * p + 4) + 12 * P * P


def row_chunks(rows: int, fit: int) -> list[tuple[int, int]]:
    """Spans of rows for chunks of at most ``fit`` rows (where the budget allows that many): the largest power
    of two within ``fit`` (at least 2), so that budgets a little apart give the same chunks, and a last chunk
    of one row joins the one before. A row's products then never run as a one-row product (a matrix-vector
    path whose sums may be ordered differently), and its result does not depend on the chunk it is in."""
    step = 2 ** max(1, int(max(fit, 1)).bit_length() - 1)
    spans = [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] == 1:
        spans[-2:] = [(spans[-2][0], rows)]
    return spans


def refit_coefficients(
    W: torch.Tensor,
    H: torch.Tensor,
    codes: torch.Tensor,
    coeffs: torch.Tensor,
    planes: int,
    group_size: int,
    *,
    ridge: float = RIDGE,
    chunk_bytes: int | None = None,
) -> RefitResult:
    """Refit every row's coefficients jointly over its groups against the full Hessian ``H``.

    ``W [out, in]`` is the *original* weight (the target), ``H [in, in]`` the layer's Hessian (symmetric
    PSD), ``codes int[out, in]`` and ``coeffs [out, groups, k+1]`` the sweep's result in original column
    order (coefficient layout ``[c_1..c_k, c_0]``, as solvers return them). Returns coefficients of
    ``coeffs``' dtype, fp16-representable, never worse per row than ``coeffs`` under ``H``. ``chunk_bytes``:
    the work budget (default :func:`memory_budget` of ``H``'s device).
    """
    out, inp = W.shape
    check_hessian(H, inp)
    if codes.shape != (out, inp):
        raise ValueError(f"codes must be [{out}, {inp}] like W, got {tuple(codes.shape)}")
    if group_size <= 0 or inp % group_size:
        raise ValueError(f"group_size {group_size} must be positive and divide in_features {inp}")
    n_groups, p = inp // group_size, planes + 1
    if coeffs.shape != (out, n_groups, p):
        raise ValueError(f"coeffs must be [{out}, {n_groups}, {p}], got {tuple(coeffs.shape)}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    return _refit(W, H, codes, coeffs, planes, group_size, ridge, chunk_bytes)


def _refit(
    W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, coeffs: torch.Tensor, planes: int, group_size: int,
    ridge: float, chunk_bytes: int | None,
) -> RefitResult:
    """:func:`refit_coefficients` on checked inputs (a solver's, whose ``H`` was checked before the sweep)."""
    out, inp = W.shape
    n_groups, p = inp // group_size, planes + 1
    H32 = H.to(torch.float32)
    budget = memory_budget(H.device) if chunk_bytes is None else chunk_bytes
    new = coeffs.clone()
    before = after = reference = 0.0
    improved = 0
    for r0, r1 in row_chunks(out, budget // row_bytes(inp, planes, group_size)):
        R = r1 - r0
        V = design(codes[r0:r1], planes, group_size)  # [R, p, G, g] float32
        old = coeffs[r0:r1]
        c_old = old.to(COEFF_DTYPE).to(torch.float32).reshape(R, n_groups * p)  # the stored values
        E = W[r0:r1].to(torch.float32) - dequant_rows(V, old)
        X = E @ H32  # (H E_r)^T per row (H symmetric)
        loss_old = torch.linalg.vecdot(X, E).to(torch.float64)
        y = torch.einsum("riat,rat->rai", V, X.view(R, n_groups, group_size)).reshape(R, -1)
        del X, E
        gram = gram_matrices(V, H32)
        del V
        d = _solve_rows(gram, y, ridge)
        cand = _candidates(old, d)
        dc = cand.to(COEFF_DTYPE).to(torch.float64).reshape(R, -1) - c_old.to(torch.float64)
        gain = _quadratic(gram, dc.to(torch.float32)) - 2.0 * torch.linalg.vecdot(dc, y.to(torch.float64))
        better = torch.isfinite(gain) & (gain < -MIN_GAIN * loss_old)
        new[r0:r1] = torch.where(better.view(-1, 1, 1), cand, old)
        before += float(loss_old.sum())
        after += float((loss_old + torch.where(better, gain, torch.zeros_like(gain))).sum())
        improved += int(better.sum())
        # tr(W H W^T) = sum_r |E_r|_H^2 + 2 c_r^T D_r^T H E_r + c_r^T G_r c_r
        reference += float((loss_old + 2.0 * torch.linalg.vecdot(c_old, y).to(torch.float64) + _quadratic(gram, c_old)).sum())
    return RefitResult(new, before, after, improved, out, reference)


def _quadratic(gram: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``c_r^T G_r c_r`` per row: float32 products, float64 result."""
    return torch.linalg.vecdot(torch.bmm(gram, c.unsqueeze(-1)).squeeze(-1), c).to(torch.float64)


def _candidates(old: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``old + d`` rounded to fp16 in ``old``'s dtype; rows out of the fp16 range keep ``old``."""
    c = old.to(torch.float64) + d.view(old.shape)
    fits = torch.isfinite(c).all(2).all(1) & (c.abs().amax((1, 2)) <= torch.finfo(COEFF_DTYPE).max)
    c = torch.where(fits.view(-1, 1, 1), c, old.to(torch.float64))
    return c.to(COEFF_DTYPE).to(old.dtype)


def apply_refit(
    mode: Refit | str, W: torch.Tensor | None, H: torch.Tensor, codes: torch.Tensor, coeffs: torch.Tensor, planes: int,
    group_size: int, *, shift: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float | int], tuple[float, float] | None]:
    """A solver's ``refit`` option: ``(coeffs, stats extra, (proxy_loss, relative_loss) or None)``; ``W`` is
    the original weight (``None`` for ``none``). The refit's losses are the solver's statistics: no second
    pass over ``H`` for them. ``shift > 0``: refit against ``H + shift I`` (a float32 copy), the damped
    Hessian the sweep factorised when ``H`` itself was not positive definite: under an indefinite ``H`` the
    least-squares 'loss' has no minimum, and the refit would take coefficients far from the weights. Its
    losses are then not ``H``'s, and none are returned (the solver's caller computes them under ``H``)."""
    if Refit(mode) is Refit.NONE or W is None:
        return coeffs, {}, None
    if shift > 0:
        H = H.to(torch.float32, copy=True)
        H.diagonal().add_(shift)
    res = _refit(W, H, codes, coeffs, planes, group_size, RIDGE, None)  # Solver.__call__ checked W, H and the group size
    if shift > 0:
        return res.coeffs, {"refit": res.to_dict() | {"shift": shift}}, None
    loss = max(res.loss_after, 0.0)
    return res.coeffs, {"refit": res.to_dict()}, (loss, relative_loss(loss, res.reference))


def design(codes: torch.Tensor, planes: int, group_size: int) -> torch.Tensor:
    """The rows' plane bits and the ones column as ``float32 [rows, k+1, groups, g]``."""
    rows, inp = codes.shape
    shifts = torch.arange(planes, device=codes.device).view(1, planes, 1)
    V = torch.ones(rows, planes + 1, inp, dtype=torch.float32, device=codes.device)
    V[:, :planes] = ((codes.unsqueeze(1) >> shifts) & 1).to(torch.float32)
    return V.view(rows, planes + 1, inp // group_size, group_size)


def dequant_rows(V: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """``Q [rows, in]`` in float32 from the design ``V`` and coefficients ``[rows, groups, k+1]``, rounded to
    their storage dtype first: :func:`bpdq.quantized.dequantize_bits`, the bits of the stored model."""
    rows, _, n_groups, g = V.shape
    c = coeffs.to(COEFF_DTYPE).to(torch.float32).permute(2, 0, 1).unsqueeze(-1)  # [p, rows, G, 1]
    return dequantize_bits(V.transpose(0, 1), c).view(rows, n_groups * g)


def gram_matrices(V: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``D_r^T H D_r`` per row, float32 ``[R, P, P]`` (index ``(a, i)``: group, then plane; ``H`` symmetric).

    Built one column group ``b`` at a time for all ``R`` rows at once, over the groups ``a <= b`` only (the
    rest is mirrored): block ``(a, b)`` is ``V_ra H_ab V_rb^T``, and ``V_rb`` times ``H``'s rows of group
    ``b`` gives it for every ``a`` at once. The ones column's product ``1^T H_b`` is the same for every row
    and computed once. Half the multiply-adds of the whole ``H D_r``, and the work buffer is ``R p in``
    floats, not ``R p G in``.
    """
    R, p, G, g = V.shape
    k = p - 1
    gram = torch.empty(R, G, p, G, p, dtype=torch.float32, device=V.device)
    VT = V.transpose(1, 2).contiguous()  # [R, G, p, g]: per row and group, the p x g block
    M = torch.empty_like(VT)
    for b in range(G):
        n = (b + 1) * g
        Hb = H[b * g : n, :n]
        # M[r, a, j, t] = sum_s V[r, j, b, s] H[(b, s), (a, t)] for the groups a <= b (j = k: the ones), laid
        # out like VT so that the small per-group products below read contiguous blocks
        M[:, : b + 1, :k] = (VT[:, b, :k].reshape(R * k, g) @ Hb).view(R, k, b + 1, g).transpose(1, 2)
        M[:, : b + 1, k] = Hb.sum(0).view(1, b + 1, g)
        # block[r, a, i, j] = sum_t V[r, i, a, t] M[r, a, j, t] = gram[r, (a, i), (b, j)]
        block = torch.matmul(VT[:, : b + 1], M[:, : b + 1].transpose(2, 3))
        gram[:, : b + 1, :, b, :] = block
        gram[:, b, :, : b + 1, :] = block.permute(0, 3, 1, 2)
    return gram.view(R, G * p, G * p)


def _solve_rows(gram: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """``d`` of ``(G_r + lam_r I) d = y_r`` per row, float64 ``[R, P]``: a float32 Cholesky, and float64 for
    the rows where it fails or leaves a residual above :data:`SOLVE_TOL`; rows that fail both get ``d = 0``
    (they keep their coefficients)."""
    A = gram + gram.transpose(1, 2)
    A.mul_(0.5)
    diag = A.diagonal(dim1=1, dim2=2)
    lam = (ridge * diag.mean(1, dtype=torch.float64)).clamp_min(1e-30 if ridge > 0 else 0.0)
    diag.add_(lam.to(torch.float32).unsqueeze(1))
    L, info = torch.linalg.cholesky_ex(A)
    d32 = torch.cholesky_solve(y.unsqueeze(-1), L).squeeze(-1)
    del L
    residual = torch.linalg.vector_norm(torch.bmm(A, d32.unsqueeze(-1)).squeeze(-1) - y, dim=1)
    bad = (info != 0) | ~torch.isfinite(d32).all(1) | ~(residual <= SOLVE_TOL * torch.linalg.vector_norm(y, dim=1))
    d = d32.to(torch.float64)
    rows = bad.nonzero().squeeze(1)
    if rows.numel():
        A64 = gram[rows].to(torch.float64)
        A64 = 0.5 * (A64 + A64.transpose(1, 2))
        A64.diagonal(dim1=1, dim2=2).add_(lam[rows].unsqueeze(1))
        sol, status = torch.linalg.solve_ex(A64, y[rows].to(torch.float64).unsqueeze(-1))
        sol = sol.squeeze(-1)
        sol[(status != 0) | ~torch.isfinite(sol).all(1)] = 0.0
        d[rows] = sol
    return d
