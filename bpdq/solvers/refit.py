"""Joint refit of the coefficients with the layer's full Hessian (planes frozen).

The sweep fits each group's coefficients in its local whitened metric, one group at a time. With the planes
fixed, ``Q(c)`` is linear in all of a row's coefficients, so the layer's proxy loss

    tr((W - Q(c)) H (W - Q(c))^T) = sum_r (W_r - D_r c_r)^T H (W_r - D_r c_r)

splits into independent least-squares problems, one per output row, of size ``groups * (k+1)``. ``D_r`` is
the row's design matrix: column ``(a, i)`` holds plane ``i``'s bits of group ``a`` (``i = k``: ones) inside
group ``a``'s columns and zeros elsewhere. The normal equations

    (D_r^T H D_r + lam_r I) c_r = D_r^T H W_r + lam_r c_r_old

carry a small ridge *towards the old coefficients* (``lam_r = ridge * mean(diag(D_r^T H D_r))``), so a
direction the calibration data does not determine (a plane that is empty in a group, a rank-deficient ``H``)
keeps its old value instead of making the system singular. The result is rounded to fp16 (the storage
precision) and a row keeps its old coefficients unless the rounded solution lowers that row's loss, so the
layer's proxy loss can only go down.

Cost per row: about ``(k+1) * in^2 / 2`` multiply-adds for the Gram matrix ``D_r^T H D_r`` (float32, built one
column group at a time over the blocks on and above the diagonal: :func:`gram_matrices`), ``in^2`` for
``H W_r``, a ``[P, P]`` solve (float64), ``P = groups * (k+1)``, and the old and new losses (float64, about
``in^2`` multiply-adds for both, by the symmetry of ``H``). Rows are processed in chunks, and each chunk's
normal equations in sub-chunks, whose work buffers stay under ``chunk_bytes`` (a 2048x5632 refit at k=2: 21 s
and 172 MB above its inputs on one thread, where the whole ``H D_r`` per row took 49 s and 395 MB).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from bpdq.grids.base import round_coeffs
from bpdq.quantized import COEFF_DTYPE, dequantize_bits
from bpdq.solvers.base import quadratic_forms, relative_loss
from bpdq.solvers.hessian import check_hessian

#: Default bound on the refit's work buffers (bytes): rows are taken in chunks whose ``[rows, in]`` buffers
#: (the weight, ``H W``, the planes, the float64 loss terms) stay under it, and each chunk's normal equations are
#: built in sub-chunks whose Gram work (one column group's ``H D`` products, the ``[P, P]`` systems) does too.
CHUNK_BYTES = 64 * 2**20


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


def _rows_within(budget: int, per_row: int, rows: int) -> int:
    return max(1, min(rows, budget // max(per_row, 1)))


def refit_coefficients(
    W: torch.Tensor,
    H: torch.Tensor,
    codes: torch.Tensor,
    coeffs: torch.Tensor,
    planes: int,
    group_size: int,
    *,
    ridge: float = 1e-6,
    chunk_bytes: int = CHUNK_BYTES,
) -> RefitResult:
    """Refit every row's coefficients jointly over its groups against the full Hessian ``H``.

    ``W [out, in]`` is the *original* weight (the target), ``H [in, in]`` the layer's Hessian (symmetric
    PSD), ``codes int[out, in]`` and ``coeffs [out, groups, k+1]`` the sweep's result in original column
    order (coefficient layout ``[c_1..c_k, c_0]``, as solvers return them). Returns coefficients of
    ``coeffs``' dtype, fp16-representable, never worse per row than ``coeffs`` under ``H``.
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
    H32 = H.to(torch.float32)
    chunk = _rows_within(chunk_bytes, inp * (8 + 4 * p + 40), out)  # W32, HW, V, the loss terms (float64)
    new = coeffs.clone()
    before = after = reference = 0.0
    improved = 0
    for r0 in range(0, out, chunk):
        r1 = min(out, r0 + chunk)
        V = design(codes[r0:r1], planes, group_size)  # [R, p, G, g] float32
        old = coeffs[r0:r1]
        W32 = W[r0:r1].to(torch.float32)
        HW = W32 @ H32  # (H W_r)^T per row (H symmetric)
        sol = torch.cat([
            _solve_rows(HW[s0:s1].view(s1 - s0, n_groups, group_size), H32, V[s0:s1], old[s0:s1].to(torch.float64), ridge)
            for s0, s1 in _spans(r1 - r0, _rows_within(chunk_bytes, 16 * p * inp + 28 * (p * n_groups) ** 2, r1 - r0))
        ])
        cand = round_coeffs(sol.to(coeffs.dtype))
        Wr = W[r0:r1]
        losses = row_losses(torch.cat([Wr, Wr]), torch.cat([dequant_rows(V, old), dequant_rows(V, cand)]), H)
        loss_old, loss_new = losses[: r1 - r0], losses[r1 - r0 :]
        better = torch.isfinite(loss_new) & (loss_new < loss_old)
        new[r0:r1] = torch.where(better.view(-1, 1, 1), cand, old)
        before += float(loss_old.sum())
        after += float(torch.where(better, loss_new, loss_old).sum())
        improved += int(better.sum())
        reference += float((HW * W32).sum(dtype=torch.float64))
    return RefitResult(new, before, after, improved, out, reference)


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
    res = refit_coefficients(W, H, codes, coeffs, planes, group_size)
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


def row_losses(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``(W_r - Q_r) H (W_r - Q_r)^T`` per row, in float64 (symmetric blocks: half the multiply-adds; ``H``
    is converted one block of rows at a time, never whole)."""
    return quadratic_forms(W.to(torch.float64) - Q.to(torch.float64), H, dtype=torch.float64)


def _spans(n: int, step: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def gram_matrices(V: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``D_r^T H D_r`` per row, float32 ``[R, P, P]`` (index ``(a, i)``: group, then plane; ``H`` symmetric).

    Built one column group ``b`` at a time, over the groups ``a <= b`` only (the rest is mirrored): block
    ``(a, b)`` is ``V_ra H_ab V_rb^T``, and ``V_rb`` times ``H``'s rows of group ``b`` gives it for every ``a``
    at once. Half the multiply-adds of the whole ``H D_r``, and the work buffer is ``R p in`` floats, not
    ``R p G in``.
    """
    R, p, G, g = V.shape
    gram = torch.empty(R, G, p, G, p, dtype=torch.float32, device=V.device)
    VT = V.transpose(1, 2).contiguous()  # [R, G, p, g]: per row and group, the p x g block
    for b in range(G):
        n = (b + 1) * g
        # M[r, j, a, t] = sum_s V[r, j, b, s] H[(b, s), (a, t)] for the groups a <= b
        M = (VT[:, b].reshape(R * p, g) @ H[b * g : n, :n]).view(R, p, b + 1, g)
        # block[r, a, i, j] = sum_t V[r, i, a, t] M[r, j, a, t] = gram[r, (a, i), (b, j)]
        block = torch.matmul(VT[:, : b + 1], M.permute(0, 2, 3, 1))
        gram[:, : b + 1, :, b, :] = block
        gram[:, b, :, : b + 1, :] = block.permute(0, 3, 1, 2)
    return gram.view(R, G * p, G * p)


def _solve_rows(HW: torch.Tensor, H: torch.Tensor, V: torch.Tensor, old: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge-to-old normal equations for a chunk of rows: ``[R, G, p]`` float64; ``HW [R, G, g]`` is the rows'
    ``H W_r`` by group (float32), ``H`` the float32 Hessian."""
    R, p, G, g = V.shape
    P = p * G
    gram = gram_matrices(V, H).to(torch.float64)
    gram = 0.5 * (gram + gram.transpose(1, 2))
    rhs = torch.einsum("riat,rat->rai", V, HW).reshape(R, P).to(torch.float64)
    c_old = old.reshape(R, P)
    diag = gram.diagonal(dim1=1, dim2=2)
    lam = (ridge * diag.mean(1)).clamp_min(1e-30 if ridge > 0 else 0.0)
    gram.diagonal(dim1=1, dim2=2).add_(lam.unsqueeze(1))
    rhs = rhs + lam.unsqueeze(1) * c_old
    sol, info = torch.linalg.solve_ex(gram, rhs.unsqueeze(-1))
    sol = sol.squeeze(-1)
    fp16_max = torch.finfo(torch.float16).max
    bad = (info != 0) | ~torch.isfinite(sol).all(1) | (sol.abs().amax(1) > fp16_max)
    sol[bad] = c_old[bad]
    return sol.view(R, G, p)
