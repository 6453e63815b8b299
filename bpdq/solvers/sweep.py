"""Shared set-up of the Hessian-aware column sweep (GPTQ, BPDQ): dead inputs, column order, damped inverse
Cholesky factor, and restoring the original column order for storage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bpdq.solvers.hessian import check_hessian, damped_inverse_cholesky, row_blocks
from bpdq.solvers.ordering import Order, column_permutation


#: Smallest damping (relative, after retries) at which :func:`sweep_proxy_loss` is used: below it the damped
#: Hessian can be so ill-conditioned that the float32 factor ``U`` no longer inverts it to ~1e-4 (measured:
#: 2e-8..8e-6 relative at damp >= 1e-3 on correlated, rank-deficient, outlier-heavy Hessians; 1.5e-3 at 0).
SWEEP_LOSS_MIN_DAMP = 1e-3

#: Entries of ``H`` gathered at a time into the working copy (two temporaries of that size beside both).
_COPY_BLOCK = 1 << 20


@dataclass
class SweepLayer:
    """A layer ready to sweep: weights and factor in sweep order (``W[:, perm]``)."""

    W: torch.Tensor  # [out, in], dead inputs zeroed, permuted
    U: torch.Tensor  # [in, in] upper, (H_damped)^-1 = U^T U in sweep order
    perm: torch.Tensor | None  # sweep column j is original column perm[j]; None = identity
    damp: float  # damping actually used (after retries)
    retries: int
    n_dead: int
    mean_diag: float  # mean(diag H) of the factorised Hessian (dead inputs fixed): damping adds damp * mean_diag * I
    dead: torch.Tensor  # bool [in], dead inputs in sweep order
    loss_from_errors: bool  # sweep_proxy_loss applies: damp >= SWEEP_LOSS_MIN_DAMP, dead rows/columns of H all zero

    def refit_shift(self) -> float:
        """What a refit adds to ``H``'s diagonal: the sweep's damping when ``H`` needed more than was asked
        (a failed factorization: ``H`` is not positive definite), else nothing."""
        return self.damp * self.mean_diag if self.retries else 0.0

    def extra(self) -> dict[str, Any]:
        return {"damp": self.damp, "cholesky_retries": self.retries, "dead_inputs": self.n_dead}


@dataclass
class SweepFactor:
    """What :func:`prepare_layer` factorises, computed ahead (:func:`sweep_factor`): ``U`` in sweep order, the
    damping used, its retries and ``mean(diag H)`` of the factorised Hessian."""

    U: torch.Tensor
    damp: float
    retries: int
    mean_diag: float


def _setup(H: torch.Tensor, group_size: int, order: Order | str) -> tuple[torch.Tensor, bool, torch.Tensor, torch.Tensor | None]:
    """Dead inputs (``H_jj = 0``, original order), whether they are isolated (their rows of ``H`` all zero),
    the column order, and ``H``'s diagonal in that order with dead entries set to 1."""
    dead = torch.diagonal(H) == 0
    isolated = not bool(H[dead].any())  # else H is not PSD: the loss comes from the explicit formula
    diag = torch.diagonal(H).clone()
    diag[dead] = 1.0
    perm = column_permutation(order, diag, group_size)
    return dead, isolated, (diag if perm is None else diag[perm]), perm


def _factorise(H: torch.Tensor, diag: torch.Tensor, perm: torch.Tensor | None, dtype: torch.dtype, damp: float) -> SweepFactor:
    """:func:`damped_inverse_cholesky` of one working copy of ``H`` in ``dtype``: permuted, its diagonal
    replaced by ``diag`` (built in blocks of rows)."""

    def working_copy() -> torch.Tensor:
        work = torch.empty(H.shape, dtype=dtype, device=H.device)
        for r0, r1 in row_blocks(H.shape[0], _COPY_BLOCK):
            rows = H[r0:r1] if perm is None else H.index_select(0, perm[r0:r1]).index_select(1, perm)
            work[r0:r1] = rows
        torch.diagonal(work).copy_(diag.to(dtype))
        return work

    return SweepFactor(*damped_inverse_cholesky(working_copy, damp))


def sweep_factor(H: torch.Tensor, group_size: int, order: Order | str, damp: float) -> SweepFactor:
    """The factor :func:`prepare_layer` computes for ``H`` with these options and a weight of ``H``'s dtype,
    the same bits: one process may factorise for others that solve rows of the same weight."""
    check_hessian(H)
    _, _, diag, perm = _setup(H, group_size, order)
    return _factorise(H, diag, perm, H.dtype, damp)


def prepare_layer(
    W: torch.Tensor, H: torch.Tensor, group_size: int, order: Order | str, damp: float, *, release: bool = False,
    factor: SweepFactor | None = None,
) -> SweepLayer:
    """Dead inputs (``H_jj = 0``: ``H_jj = 1`` and ``W[:, j] = 0``), column order, and ``U`` of the damped
    inverse Hessian.

    ``H`` is not modified, and one ``[in, in]`` matrix exists beside it: the dead-input fix, the permutation
    and the damping go into one working copy (built in blocks of rows), which
    :func:`damped_inverse_cholesky` turns into ``U`` in place. ``factor``: that factorisation done already
    (:func:`sweep_factor` of this ``H`` with these options), used as it is. ``release``: once ``U`` exists,
    free ``H`` (:func:`~bpdq.solvers.base.release_hessian`, where the solve's caller allows it) if the proxy
    loss can come from the sweep's errors (``loss_from_errors``), before the permuted copy of ``W`` is made.
    """
    check_hessian(H, W.shape[1])
    dead, isolated, diag, perm = _setup(H, group_size, order)
    n_dead = int(dead.sum())
    if n_dead:  # dead inputs: H_jj = 1 and W[:, j] = 0 (as fix_dead_inputs)
        W = W.clone()
        W[:, dead] = 0.0
    if perm is not None:
        dead = dead[perm]
    if factor is None:
        factor = _factorise(H, diag, perm, W.dtype, damp)
    elif factor.U.shape != H.shape:
        raise ValueError(f"a sweep factor of shape {tuple(factor.U.shape)} for a Hessian of shape {tuple(H.shape)}")
    loss_from_errors = factor.damp >= SWEEP_LOSS_MIN_DAMP and isolated
    if release and loss_from_errors:
        from bpdq.solvers.base import release_hessian

        release_hessian()
    if perm is not None:
        W = W[:, perm]
    return SweepLayer(
        W=W.contiguous(), U=factor.U, perm=perm, damp=factor.damp, retries=factor.retries, n_dead=n_dead,
        mean_diag=factor.mean_diag, dead=dead, loss_from_errors=loss_from_errors,
    )


@dataclass
class SweepErrors:
    """Per sweep column ``t``: ``scaled[t] = ||E[:, t]||^2`` with the sweep's errors ``E = (w - q) / U[t, t]``
    and ``residual[t] = ||W[:, t] - Q[:, t]||^2`` (``W`` the prepared weight); float64 ``[in]``, each summed
    over the rows in the sweep's precision."""

    scaled: torch.Tensor
    residual: torch.Tensor


def sweep_proxy_loss(layer: SweepLayer, errors: SweepErrors) -> float:
    """``tr((W-Q) H (W-Q)^T)`` with the Hessian ``H`` the solver was given, from the sweep's errors alone.

    The sweep's errors satisfy ``W' - Q = E U`` (``W'`` the prepared weight), so ``||E||^2 = tr((W'-Q) H_d
    (W'-Q)^T)`` with ``H_d = U^-1 U^-T`` the factorised Hessian: ``H`` with dead inputs set to ``H_jj = 1``,
    plus ``damp * mean_diag * I``. Removing both corrections leaves the loss under ``H`` (a dead input's row
    and column of ``H`` are zero, and its weights are zeroed in ``W'``, so ``W - Q`` and ``W' - Q`` agree
    where ``H`` sees them). Exact up to float32 rounding of ``U``; callers use it when
    ``layer.loss_from_errors`` (damping at least :data:`SWEEP_LOSS_MIN_DAMP`, dead inputs really isolated).
    """
    residual = errors.residual
    loss = errors.scaled.sum() - layer.damp * layer.mean_diag * residual.sum() - residual[layer.dead].sum()
    return max(float(loss), 0.0)


def restore_order(
    codes: torch.Tensor, coeffs: torch.Tensor, perm: torch.Tensor | None, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Sweep-order ``codes [out, in]`` and ``coeffs [out, groups, k+1]`` -> original order.

    Also returns ``group_of``: sweep group ``j`` is original group ``group_of[j]``.
    """
    n_groups = codes.shape[1] // group_size
    if perm is None:
        return codes, coeffs, list(range(n_groups))
    group_of = perm[::group_size] // group_size
    out_codes = torch.empty_like(codes)
    out_codes[:, perm] = codes
    out_coeffs = torch.empty_like(coeffs)
    out_coeffs[:, group_of] = coeffs
    return out_codes, out_coeffs, group_of.tolist()


def block_width(block_size: int, group_size: int) -> int:
    """Lazy-update block width: ``block_size`` rounded down to a multiple of the group size (at least one group)."""
    return max(group_size, block_size // group_size * group_size)
