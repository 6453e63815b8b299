"""Shared set-up of the Hessian-aware column sweep (GPTQ, BPDQ): dead inputs, column order, damped inverse
Cholesky factor, and restoring the original column order for storage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bpdq.solvers.hessian import fix_dead_inputs, inverse_cholesky
from bpdq.solvers.ordering import Order, column_permutation


@dataclass
class SweepLayer:
    """A layer ready to sweep: weights and factor in sweep order (``W[:, perm]``)."""

    W: torch.Tensor  # [out, in], dead inputs zeroed, permuted
    U: torch.Tensor  # [in, in] upper, (H_damped)^-1 = U^T U in sweep order
    perm: torch.Tensor | None  # sweep column j is original column perm[j]; None = identity
    damp: float  # damping actually used (after retries)
    retries: int
    n_dead: int

    def extra(self) -> dict[str, Any]:
        return {"damp": self.damp, "cholesky_retries": self.retries, "dead_inputs": self.n_dead}


def prepare_layer(W: torch.Tensor, H: torch.Tensor, group_size: int, order: Order | str, damp: float) -> SweepLayer:
    """Dead inputs (DESIGN step 1), column order (step 2), and ``U`` of the damped inverse Hessian."""
    W, H, n_dead = fix_dead_inputs(W, H)
    perm = column_permutation(order, torch.diagonal(H), group_size)
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
    U, used, retries = inverse_cholesky(H.to(W.dtype), damp)
    return SweepLayer(W=W.contiguous(), U=U, perm=perm, damp=used, retries=retries, n_dead=n_dead)


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
