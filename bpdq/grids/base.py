"""The Grid interface: per-(row, group) quantization levels described as bit-planes + coefficients.

Every grid in bpdq describes the levels of one row of one group as

    level(q) = c_0 + sum_i c_i * bit_i(q),    q in [0, 2^k)

stored as a coefficient vector ``[c_1, ..., c_k, c_0]`` (plane coefficients first, offset last). A uniform
grid is the special case ``c_i = s * 2^(i-1)``, ``c_0 = -s*z``; a bit-plane grid places the levels freely.

Grids work on a batch of independent rows ``w: [rows, g]`` (a "row" is one output row of one group), so a
solver can treat a whole layer at once. The public methods validate then call the abstract ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from bpdq.bits import plane_matrix
from bpdq.options import Configurable
from bpdq.quantized import COEFF_DTYPE  # the format's storage dtype; bpdq.grids re-exports it


def round_coeffs(coeffs: torch.Tensor) -> torch.Tensor:
    """Round coefficients to their storage precision (fp16) and back to the working dtype.

    Values beyond the fp16 range are an error rather than a silent ``inf``.
    """
    limit = torch.finfo(COEFF_DTYPE).max
    if coeffs.abs().max().item() > limit if coeffs.numel() else False:
        raise ValueError(
            f"coefficient magnitude {coeffs.abs().max().item():.3g} exceeds the fp16 storage range "
            f"({limit:.0f}); scale the weights down before quantizing"
        )
    return coeffs.to(COEFF_DTYPE).to(coeffs.dtype)


class Grid(Configurable, ABC):
    """Abstract quantization grid over k bit-planes."""

    @property
    @abstractmethod
    def planes(self) -> int:
        """Number of bit-planes k (2^k levels)."""

    # ---- public, validating API -------------------------------------------------------------------

    def init(self, w: torch.Tensor) -> torch.Tensor:
        """Initial coefficients ``[rows, k+1]`` for the rows of ``w: [rows, g]``."""
        self._check_rows(w, "w")
        return self._init(w)

    def snap(self, w: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        """Codes ``int64[rows, g]`` of the nearest level of each value (ties go to the lower level)."""
        self._check_rows(w, "w")
        self._check_coeffs(coeffs, w.shape[0])
        return self._snap(w, coeffs)

    def fit(
        self,
        w: torch.Tensor,
        codes: torch.Tensor,
        *,
        whiten: torch.Tensor | None = None,
        alpha: float = 0.0,
    ) -> torch.Tensor:
        """Least-squares coefficients ``[rows, k+1]`` for fixed ``codes``.

        ``whiten`` (``[g, g]``, optional) is a matrix ``A`` defining the metric ``||A (x - y)||``; the
        solvers pass ``U_loc^-T`` (Hessian-whitened). ``alpha`` is a ridge weight relative to the mean
        diagonal of the normal matrix (scale free).
        """
        self._check_rows(w, "w")
        if codes.shape != w.shape:
            raise ValueError(f"codes shape {tuple(codes.shape)} must equal w shape {tuple(w.shape)}")
        if whiten is not None and whiten.shape != (w.shape[1], w.shape[1]):
            raise ValueError(f"whiten must be [{w.shape[1]}, {w.shape[1]}], got {tuple(whiten.shape)}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        return self._fit(w, codes, whiten, float(alpha))

    def levels(self, coeffs: torch.Tensor) -> torch.Tensor:
        """All 2^k levels of each row, in code order: ``[rows, 2^k]``."""
        return coeffs @ plane_matrix(self.planes, dtype=coeffs.dtype, device=coeffs.device).T

    def dequant(self, codes: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        """Values of ``codes [rows, g]`` under ``coeffs [rows, k+1]``."""
        return torch.gather(self.levels(coeffs), 1, codes.long())

    # ---- implementation hooks -----------------------------------------------------------------------

    @abstractmethod
    def _init(self, w: torch.Tensor) -> torch.Tensor: ...

    def _snap(self, w: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        """Nearest level by a sorted-threshold search (works for any level placement)."""
        lv = self.levels(coeffs)
        sorted_lv, order = lv.sort(dim=1)
        mids = (sorted_lv[:, 1:] + sorted_lv[:, :-1]) * 0.5
        idx = torch.searchsorted(mids.contiguous(), w.contiguous().to(mids.dtype), right=False)
        return torch.gather(order, 1, idx)

    def _fit(self, w: torch.Tensor, codes: torch.Tensor, whiten: torch.Tensor | None, alpha: float) -> torch.Tensor:
        design = plane_matrix(self.planes, dtype=w.dtype, device=w.device)[codes.long()]  # [rows, g, k+1]
        return ridge_lstsq(design, w, whiten, alpha)

    # ---- validation ----------------------------------------------------------------------------------

    @staticmethod
    def _check_rows(w: torch.Tensor, name: str) -> None:
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
        if w.dim() != 2:
            raise ValueError(f"{name} must be 2-D [rows, group_size], got shape {tuple(w.shape)}")
        if not w.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {w.dtype}")

    def _check_coeffs(self, coeffs: torch.Tensor, rows: int) -> None:
        if coeffs.shape != (rows, self.planes + 1):
            raise ValueError(f"coeffs must be [{rows}, {self.planes + 1}], got {tuple(coeffs.shape)}")


def ridge_lstsq(design: torch.Tensor, w: torch.Tensor, whiten: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Per-row ridge least squares: argmin_c ||A (X_r c - w_r)||^2 + alpha' ||c||^2.

    ``design`` is ``[rows, g, p]``, ``w`` is ``[rows, g]``, ``A = whiten`` (``[g, g]`` or None for the
    identity). ``alpha' = alpha * mean(diag(X_r^T A^T A X_r))`` (plus a tiny floor so that a plane that is
    constant within a row never makes the system singular). Solved in float64 for robustness.
    """
    X = design.to(torch.float64)
    y = w.to(torch.float64)
    if whiten is not None:
        A = whiten.to(torch.float64)
        X = torch.einsum("ij,rjp->rip", A, X)
        y = y @ A.T
    gram = X.transpose(1, 2) @ X  # [rows, p, p]
    rhs = (X.transpose(1, 2) @ y.unsqueeze(-1)).squeeze(-1)  # [rows, p]
    p = gram.shape[-1]
    diag_mean = gram.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True).clamp_min(1e-30)
    reg = (alpha * diag_mean + 1e-12 * diag_mean).unsqueeze(-1) * torch.eye(p, dtype=gram.dtype, device=gram.device)
    sol = torch.linalg.solve(gram + reg, rhs.unsqueeze(-1)).squeeze(-1)
    return sol.to(w.dtype)
