"""The Solver interface: a pure function of tensors ``(W, H, grid, group_size) -> QuantizedWeight``.

``Solver.__call__`` validates inputs (shapes, finiteness, group size) and times the solve; subclasses
implement ``_solve`` on a float32 copy of the weight. Hooks, layer walking and I/O live elsewhere.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from contextvars import ContextVar
from typing import Any, Callable

import torch

from bpdq.grids.base import Grid
from bpdq.options import Configurable
from bpdq.quantized import QuantizedWeight, SolveStats, check_group_size
from bpdq.solvers.hessian import check_hessian


#: The caller's Hessian of the solve in progress, when its caller allowed the solver to free it
#: (``Solver.__call__(release_hessian=True)``); see :func:`release_hessian`.
_RELEASABLE: ContextVar[tuple[torch.Tensor, ...] | None] = ContextVar("bpdq_releasable_hessian", default=None)
#: How the solve in progress gathers per-row values over the other row shares of its weight; see :func:`given_row_gather`.
_ROW_GATHER: ContextVar[Callable[[torch.Tensor], torch.Tensor] | None] = ContextVar("bpdq_row_gather", default=None)
#: The factorisation of the solve in progress made ahead (``Solver.__call__(factor=...)``); see :func:`given_factor`.
_FACTOR: ContextVar[Any] = ContextVar("bpdq_given_factor", default=None)


def release_hessian() -> bool:
    """Free the Hessian of the solve in progress, if its caller allowed it: for a solver that needs ``H`` no
    more, not even for its statistics (it must set ``stats.proxy_loss`` itself). The tensors are left with an
    empty storage; the caller promised not to read them. Frees one ``[in, in]`` matrix while the solve goes
    on (a pipeline run's peak memory is the largest layer's solve). Returns whether it freed anything."""
    tensors = _RELEASABLE.get()
    if tensors is None:
        return False
    for t in tensors:
        t.untyped_storage().resize_(0)
    _RELEASABLE.set(None)
    return True


def given_row_gather() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """How the solve in progress, of a block of rows of a larger weight (``Solver.__call__(row_gather=...)``),
    gets a per-row value of every row: ``gather(values [rows here])`` returns ``[all rows]`` in row order, the
    same tensor on every share's process. ``None``: the weight is all here."""
    return _ROW_GATHER.get()


def given_factor() -> Any:
    """The factorisation of the solve in progress that its caller made ahead with :meth:`Solver.prefactor`
    (``None`` when there is none): a solver that has one uses it instead of factorising the Hessian."""
    return _FACTOR.get()


class Solver(Configurable, ABC):
    """Abstract solver. ``requires_hessian`` solvers raise if called without one."""

    requires_hessian: bool = False
    #: Whether each output row's codes and coefficients depend on that row's weights, the Hessian and the
    #: options alone (not on the other rows): then solving a block of rows gives those rows' result, and a
    #: distributed run may split the solve by rows over its processes (statistics are sums over rows).
    rows_independent: bool = False
    #: Whether the rows depend on each other only through per-row values that the solve gathers from the
    #: other rows with :func:`given_row_gather` (so a block of rows solved with the gather gives those rows'
    #: result): a distributed run may then split the solve by rows too.
    rows_gathered: bool = False

    def __call__(
        self, weight: torch.Tensor, hessian: torch.Tensor | None, grid: Grid, group_size: int, *,
        release_hessian: bool = False, factor: Any = None,
        row_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> QuantizedWeight:
        """Quantize ``weight`` with ``hessian``. ``release_hessian``: the caller will not read ``hessian`` again,
        so the solver may free its memory once done with it (:func:`release_hessian`). ``factor``: what
        :meth:`prefactor` returned for this ``hessian`` and ``group_size`` (:func:`given_factor`).
        ``row_gather``: ``weight`` is a block of rows of a larger weight, whose other blocks are solved
        elsewhere at the same time (:func:`given_row_gather`; for a ``rows_gathered`` solver)."""
        check_weight(weight, group_size)
        if not isinstance(grid, Grid):
            raise TypeError(f"grid must be a Grid instance, got {type(grid).__name__}")
        if hessian is not None:
            if not isinstance(hessian, torch.Tensor):
                raise TypeError(f"hessian must be a torch.Tensor or None, got {type(hessian).__name__}")
            check_hessian(hessian, weight.shape[1])
        elif self.requires_hessian:
            raise ValueError(f"solver {self.name!r} needs a Hessian (calibration data); use 'rtn' without one")
        self.check_grid(grid, group_size)
        W = weight.detach().to(torch.float32).clone()
        H = hessian.detach().to(torch.float32) if hessian is not None else None
        start = time.perf_counter()
        token = _RELEASABLE.set((hessian, H) if release_hessian and hessian is not None else None)
        given, gather = _FACTOR.set(factor), _ROW_GATHER.set(row_gather)
        try:
            codes, coeffs, stats = self._solve(W, H, grid, group_size)
        finally:
            _ROW_GATHER.reset(gather)
            _FACTOR.reset(given)
            _RELEASABLE.reset(token)
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
            if H.untyped_storage().nbytes() == 0:
                raise RuntimeError(f"solver {self.name!r} released the Hessian but left no proxy loss in its stats")
            qw.stats.proxy_loss, qw.stats.relative_loss = proxy_loss(weight.detach().to(torch.float32), qw.dequantize(torch.float32), H)
        return qw

    def prefactor(self, hessian: torch.Tensor, group_size: int) -> Any:
        """The factorisation of ``hessian`` that a solve with it would make, made ahead, for ``__call__``'s
        ``factor`` (the same result, the same bits): in a distributed run one process makes it for the
        others that solve rows of the same weight. ``None`` (the default): nothing to make ahead."""
        return None

    @property
    def prefactors(self) -> bool:
        """Whether :meth:`prefactor` makes anything (the solver overrides it)."""
        return type(self).prefactor is not Solver.prefactor

    def check_grid(self, grid: Grid, group_size: int) -> None:
        """Raise ``ValueError`` if this solver cannot work with ``grid`` at ``group_size`` (the default accepts
        every grid). Recipes call it when they are validated, so a bad combination fails before any work."""

    @abstractmethod
    def _solve(
        self, W: torch.Tensor, H: torch.Tensor | None, grid: Grid, group_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, SolveStats]:
        """Return ``(codes int[out, in], coeffs float[out, groups, k+1], stats)`` in original column order."""


def proxy_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """``tr((W-Q) H (W-Q)^T)`` and its ratio to ``tr(W H W^T)`` (:func:`relative_loss`): the quadratic forms
    of the stacked ``[W-Q; W]`` in float32 (the solve's precision), summed in float64 (:func:`quadratic_forms`)."""
    out = W.shape[0]
    W32 = W.to(torch.float32)
    terms = quadratic_forms(torch.cat([W32 - Q.to(torch.float32), W32]), H)
    loss = max(float(terms[:out].sum()), 0.0)
    return loss, relative_loss(loss, float(terms[out:].sum()))


def relative_loss(loss: float, reference: float) -> float:
    """``loss / tr(W H W^T)``; ``inf`` for a positive loss of a zero reference, ``0`` for no loss."""
    return loss / reference if reference > 0 else math.inf if loss > 0 else 0.0


def quadratic_forms(X: torch.Tensor, H: torch.Tensor, *, dtype: torch.dtype = torch.float32, blocks: int = 8) -> torch.Tensor:
    """``(X H X^T)_rr`` per row of ``X [rows, in]`` as float64 ``[rows]`` (``H`` symmetric ``[in, in]``).

    Uses the symmetry of ``H``: column block ``b`` of ``X`` meets only ``H[b, b:]`` (off-diagonal blocks
    counted twice), about ``(1 + 1/blocks) / 2`` of the multiply-adds of ``(X @ H) * X``. Products and each
    block's row dot products in ``dtype`` (float32: the solve's precision), the sum over blocks in float64.
    ``H`` is converted to ``dtype`` one block of rows at a time (no whole copy).
    """
    Xc = X.to(dtype)
    inp = Xc.shape[1]
    width = -(-inp // blocks)
    total = torch.zeros(Xc.shape[0], dtype=torch.float64, device=Xc.device)
    for b0 in range(0, inp, width):
        b1 = min(inp, b0 + width)
        P = Xc[:, b0:b1] @ H[b0:b1, b0:].to(dtype)
        total += torch.linalg.vecdot(P[:, : b1 - b0], Xc[:, b0:b1]).to(torch.float64)
        if b1 < inp:
            total += 2.0 * torch.linalg.vecdot(P[:, b1 - b0 :], Xc[:, b1:]).to(torch.float64)
    return total


def check_weight(weight: object, group_size: object) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"weight is empty: shape {tuple(weight.shape)}")
    check_group_size(group_size, weight.shape[1])
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf values; all entries must be finite")


def group_rows(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out * groups, group_size]`` (each row of the result is one row of one group)."""
    out, inp = W.shape
    return W.reshape(out * (inp // group_size), group_size)
