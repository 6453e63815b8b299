"""Batched whitened ridge fit of bit-plane coefficients for one group (BPDQ step b and the refits).

Computes what ``BitPlaneGrid.fit(w, codes, whiten=A, alpha=alpha)`` computes (``bpdq.grids.base.ridge_lstsq``:
float64 normal equations of ``||A (X c - w)||^2`` with the relative ridge ``alpha * mean(diag(gram))``) up to
float64 rounding, but faster: with ``M = A^T A`` the normal matrix of a row is ``X^T M X``; the plane
columns of all rows go through one GEMM with ``M``, the constant column's terms (``M 1``, ``1^T M 1``) and
``M w`` are computed once per group and reused across its refits. A refit can be limited to the rows whose
codes changed (the others keep their coefficients: same codes, same fit).
"""

from __future__ import annotations

import torch


class WhitenedFit:
    """``fit(codes) -> coeffs [rows, k+1]`` for fixed group weights ``w [rows, g]`` and whitening ``A [g, g]``."""

    def __init__(self, w: torch.Tensor, whiten: torch.Tensor, alpha: float, planes: int) -> None:
        A = whiten.to(torch.float64)
        self.M = A.T @ A  # [g, g], symmetric
        self.M1 = self.M.sum(0)  # M 1
        self.Mw = (w.to(torch.float64) @ self.M).unsqueeze(2)  # [rows, g, 1]
        self.alpha = alpha
        self.dtype = w.dtype
        self.k = planes
        self.shifts = torch.arange(planes, device=w.device).view(planes, 1)
        self.eye = torch.eye(planes + 1, dtype=torch.float64, device=w.device)

    def __call__(self, codes: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Coefficients for ``codes [rows, g]``; ``rows`` (indices) selects a subset of the weight rows."""
        k, p = self.k, self.k + 1
        Mw = self.Mw if rows is None else self.Mw[rows]
        n, g = codes.shape
        bits = ((codes.unsqueeze(1) >> self.shifts) & 1).to(torch.float64)  # [rows, k, g]
        MB = (bits.view(n * k, g) @ self.M).view(n, k, g)  # rows of (M b_i)^T
        gram = torch.empty(n, p, p, dtype=torch.float64, device=codes.device)
        gram[:, :k, :k] = torch.bmm(MB, bits.transpose(1, 2))
        gram[:, :k, k] = gram[:, k, :k] = bits @ self.M1
        gram[:, k, k] = self.M1.sum()
        rhs = torch.empty(n, p, dtype=torch.float64, device=codes.device)
        rhs[:, :k] = torch.bmm(bits, Mw).squeeze(2)
        rhs[:, k] = Mw.sum(1).squeeze(1)
        diag_mean = gram.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True).clamp_min(1e-30)
        reg = (self.alpha * diag_mean + 1e-12 * diag_mean).unsqueeze(-1) * self.eye
        sol = torch.linalg.solve(gram + reg, rhs.unsqueeze(-1)).squeeze(-1)
        return sol.to(self.dtype)
