"""Hessian tools of the GPTQ family: streaming accumulation of ``H = 2/n * sum x x^T``, dead-input
handling, damping and the upper Cholesky factor of the inverse Hessian."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


#: Rows per block of :class:`HessianAccumulator`'s upper-triangle sum: smaller blocks skip more of the lower
#: triangle, larger ones multiply faster. 384 took 0.63x the time of one whole ``x^T x`` at 1536 inputs and
#: about 0.7x at 576 (4096 tokens, one thread, float32), and on SmolLM2 gave the same checkpoint as whole
#: blocks; 256 was 5% faster again but changed the float sums, and with them some 2-bit choices.
_ROWS = 384
#: Largest float64 product (bytes) :meth:`HessianAccumulator.subtract_product_` makes at once.
_PRODUCT_BYTES = 1 << 28


class HessianAccumulator:
    """Streaming ``H = 2/n * sum_t x_t x_t^T`` over batches of any leading shape ``[..., in_features]``.

    Each batch's ``x^T x`` is computed in ``dtype`` (float32 by default, ``torch.float64`` for extra
    precision; also inside ``torch.autocast``) on ``device`` (the inputs' device when ``None``) and added
    to a float64 sum: a sum of per-batch terms in float64 hardly depends on how the batches are grouped, so
    a distributed run's Hessian (per-rank sums, reduced) rounds to the same ``dtype`` values as one
    process's. Only the upper triangle is summed, in blocks of at most 384 rows (block ``[r0, r1)`` holds
    columns ``r0:``), and :attr:`hessian` mirrors it: memory is about ``4 in^2`` bytes for the sum (half of a
    whole float64 matrix, and about half the multiply-adds), plus the ``dtype`` result while
    :attr:`hessian` hands it out.
    """

    def __init__(self, in_features: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        if not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.in_features = in_features
        self.dtype = dtype
        self.device = device
        self._ranges = row_blocks(in_features, min(1 << 22, _ROWS * in_features))
        self._blocks: list[torch.Tensor] | None = None  # float64 [r1 - r0, in - r0] per range
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"inputs must end in in_features={self.in_features}, got shape {tuple(x.shape)}")
        x2 = x.detach().reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return
        n = self.in_features
        if self._blocks is None:
            dev = self.device if self.device is not None else x2.device
            self._blocks = [torch.zeros(r1 - r0, n - r0, dtype=torch.float64, device=dev) for r0, r1 in self._ranges]
        x2 = x2.to(device=self._blocks[0].device, dtype=self.dtype)
        with torch.autocast(x2.device.type, enabled=False):  # products in ``dtype`` inside an autocast pass
            for (r0, r1), block in zip(self._ranges, self._blocks):
                block.add_(x2[:, r0:r1].T @ x2[:, r0:])
        self.n += x2.shape[0]

    def start(self) -> "HessianAccumulator":
        """Allocate the zero sums now (on ``device``, the CPU when ``None``), so that an accumulator that
        receives no input still takes part in a reduction over the ranks. Returns the accumulator."""
        if self._blocks is None:
            n = self.in_features
            self._blocks = [torch.zeros(r1 - r0, n - r0, dtype=torch.float64, device=self.device) for r0, r1 in self._ranges]
        return self

    def reduce(self, reduce_block: Callable[[torch.Tensor, int], tuple[torch.Tensor, int]]) -> None:
        """Combine this accumulator with others of the same shape, e.g. over the ranks of a distributed run:
        ``reduce_block(block, n)`` is called on each float64 block of the sum, in order, with the number of
        inputs ``n`` accumulated here, and returns the combined ``(block, n)`` (a sum of blocks and of counts;
        the identity in a single process). The accumulator itself never communicates."""
        if self._blocks is None:
            raise ValueError("no calibration inputs were accumulated on this rank; nothing to reduce")
        reduced = [reduce_block(block, self.n) for block in self._blocks]
        self._blocks = [block for block, _ in reduced]
        self.n = reduced[0][1]

    @property
    def sums(self) -> list[torch.Tensor]:
        """The float64 blocks of the upper-triangle sum, in order, for a caller that combines accumulators in
        place (e.g. a reduction over the ranks of a distributed run; it then sets :attr:`n` to the combined
        count)."""
        if self._blocks is None:
            raise ValueError("no calibration inputs were accumulated on this rank; nothing to reduce")
        return list(self._blocks)

    @property
    def hessian(self) -> torch.Tensor:
        """``H`` in ``dtype``: each block of rows converted, then mirrored below the diagonal (exactly
        symmetric outside the diagonal blocks, which are summed whole)."""
        if self._blocks is None or self.n == 0:
            raise ValueError("no calibration inputs were accumulated; the Hessian is undefined")
        H = torch.empty(self.in_features, self.in_features, dtype=self.dtype, device=self._blocks[0].device)
        for (r0, r1), block in zip(self._ranges, self._blocks):
            rows = block.to(self.dtype, copy=True).mul_(2.0 / self.n)
            if not torch.isfinite(rows).all():
                raise ValueError("the accumulated Hessian contains NaN or Inf values (non-finite calibration inputs?)")
            H[r0:r1, r0:] = rows
            H[r1:, r0:r1] = rows[:, r1 - r0 :].T
        return H

    def subtract_product_(self, out: torch.Tensor, W: torch.Tensor) -> None:
        """``out -= W H`` in float64 (``out``: float64 ``[rows, in_features]``, ``W``: ``[rows, in_features]``),
        read from the float64 sum's blocks without making ``H``: ``W``'s columns converted a block at a time,
        for a block of rows at a time (no ``[rows, in_features]`` float64 temporary)."""
        if self._blocks is None or self.n == 0:
            raise ValueError("no calibration inputs were accumulated; the Hessian is undefined")
        scale = 2.0 / self.n
        step = max(1, _PRODUCT_BYTES // (8 * self.in_features))  # rows of ``out`` at a time
        for o0 in range(0, out.shape[0], step):
            o, w = out[o0:o0 + step], W[o0:o0 + step]
            for i, ((r0, r1), block) in enumerate(zip(self._ranges, self._blocks)):
                W_i = w[:, r0:r1].to(device=out.device, dtype=torch.float64)
                o[:, r0:].sub_(W_i @ block, alpha=scale)  # H[r0:r1, r0:], the upper part of the block's rows
                for s0, s1 in self._ranges[i + 1:]:  # H[s0:s1, r0:r1] below the diagonal: the block's transpose
                    W_s = w[:, s0:s1].to(device=out.device, dtype=torch.float64)
                    o[:, r0:r1].sub_(W_s @ block[:, s0 - r0:s1 - r0].T, alpha=scale)


def check_hessian(H: object, in_features: int | None = None) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``H`` can be a Hessian ``2/n sum x x^T`` (of ``in_features``).

    Checked: a finite square float matrix, symmetric (to ``1e-3`` of its largest entry), no negative
    diagonal entry (``-H`` or another matrix that cannot be positive semi-definite) and not all zero (no
    calibration signal: every solver would return zero weights). An indefinite matrix with a non-negative
    diagonal is only found by the Cholesky factorization, which then retries with more damping and warns
    (:func:`inverse_cholesky`). Costs ``O(n^2)`` time and no ``[n, n]`` temporary.
    """
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"hessian must be a torch.Tensor, got {type(H).__name__}")
    if not H.is_floating_point():
        raise TypeError(f"hessian must be floating point, got {H.dtype}")
    n = H.shape[0] if H.dim() == 2 else -1
    if H.dim() != 2 or H.shape[1] != n or (in_features is not None and n != in_features):
        want = f"[in_features, in_features] = [{in_features}, {in_features}]" if in_features is not None else "square [n, n]"
        raise ValueError(f"hessian must be {want}, got {tuple(H.shape)}")
    finite, scale, asym = True, 0.0, 0.0
    for r0, r1 in row_blocks(n):  # blocks of rows: no [n, n] temporary
        block = H[r0:r1]
        finite = finite and bool(torch.isfinite(block).all())
        if not finite:
            break
        scale = max(scale, float(block.abs().amax()))
        asym = max(asym, float((block - H[:, r0:r1].T).abs().amax()))
    if not finite:
        raise ValueError("hessian contains NaN or Inf values; all entries must be finite")
    if scale == 0.0:
        raise ValueError(
            "hessian is all zero: the calibration inputs of this layer were all zero, so every weight would be "
            "quantized to zero; check the calibration data, or use solver 'rtn' (no Hessian)"
        )
    negative = int((torch.diagonal(H) < 0).sum())
    if negative:
        raise ValueError(
            f"hessian has {negative} negative diagonal entries, so it is not positive semi-definite (a Hessian is "
            "2/n sum x x^T; was it negated or built from something else?)"
        )
    if asym > 1e-3 * scale:
        raise ValueError(
            f"hessian is not symmetric: max |H - H^T| = {asym:.3g} (largest entry {scale:.3g}); a Hessian is "
            "2/n sum x x^T"
        )


def _mirror_lower(A: torch.Tensor) -> None:
    """``A[i, j] = A[j, i]`` for ``j > i``, in place, a block of rows at a time."""
    for r0, r1 in row_blocks(A.shape[0]):
        A[r0:r1, r1:] = A[r1:, r0:r1].mT
        D = A[r0:r1, r0:r1]
        upper = torch.ones(r1 - r0, r1 - r0, dtype=torch.bool, device=A.device).triu_(1)
        D.copy_(torch.where(upper, D.mT, D))


def row_blocks(n: int, elements: int = 1 << 22) -> list[tuple[int, int]]:
    """``[r0, r1)`` ranges of about ``elements`` entries of an ``[n, n]`` matrix each (at least one row)."""
    step = max(1, elements // max(n, 1))
    return [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]


def fix_dead_inputs(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Dead inputs (``H_jj == 0``, never active in calibration): ``H_jj = 1`` and ``W[:, j] = 0``.

    Returns new ``(W, H, n_dead)``; the inputs are not modified.
    """
    check_hessian(H, W.shape[1])
    dead = torch.diagonal(H) == 0
    n_dead = int(dead.sum())
    if not n_dead:
        return W, H, 0
    H = H.clone()
    H[dead, dead] = 1.0
    W = W.clone()
    W[:, dead] = 0.0
    return W, H, n_dead


def inverse_cholesky(
    H: torch.Tensor, damp: float = 0.01, *, max_retries: int = 6, growth: float = 10.0
) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor ``U`` of the damped inverse Hessian: ``(H + lam * mean(diag H) I)^-1 = U^T U``.

    ``lam`` starts at ``damp``; when a factorization fails (rank-deficient or indefinite ``H``) it is
    multiplied by ``growth`` and retried, up to ``max_retries`` times, with a logged warning each time.
    Returns ``(U, lam_used, retries)``; raises ``ValueError`` when every attempt fails. Memory: one ``[n, n]``
    matrix besides ``H`` (see :func:`damped_inverse_cholesky`).
    """
    check_hessian(H)
    U, lam, retries, _ = damped_inverse_cholesky(H.clone, damp, max_retries=max_retries, growth=growth)
    return U, lam, retries


def damped_inverse_cholesky(
    build: Callable[[], torch.Tensor], damp: float, *, max_retries: int = 6, growth: float = 10.0,
    what: str = "the Hessian", widen: bool = False,
) -> tuple[torch.Tensor, float, int, float]:
    """:func:`inverse_cholesky` of the matrix ``build()`` returns (a fresh copy each call, read from its lower
    triangle), with one ``[n, n]`` matrix alive: the damping, the factor, the inverse and ``U`` are all
    computed in place in that copy. ``build`` is called again on a retry, so the caller's matrix is never
    modified. ``widen``: a float32 copy that fails is retried in float64 at the same damping before the
    damping grows (``U`` is then float64). ``what`` names the matrix in the warnings. Returns
    ``(U, lam_used, retries, mean(diag))``."""
    mean_diag = scale = 0.0

    def factorize(lam: float, attempt: int) -> torch.Tensor | None:
        U, dtype = attempt_at(lam, attempt, False)
        if U is None and widen and dtype == torch.float32:
            logger.warning("float32 Cholesky factorization of %s failed at damp=%.3g; retrying in float64", what, lam)
            U, _ = attempt_at(lam, attempt, True)
        return U

    def attempt_at(lam: float, attempt: int, wide: bool) -> tuple[torch.Tensor | None, torch.dtype]:
        nonlocal mean_diag, scale
        work = build()
        dtype = work.dtype
        if wide:
            work = work.to(torch.float64)
        if attempt == 0 and not wide:
            mean_diag = float(torch.diagonal(work).mean())
            scale = mean_diag if mean_diag > 0 else 1.0
        torch.diagonal(work).add_(lam * scale)
        _mirror_lower(work)
        # In place, in the column-major view of the (now exactly symmetric) copy: LAPACK works on it without
        # a copy, and the factors have the bits torch.linalg gives on a copy (it factorises the lower triangle).
        U = work.mT
        info = torch.empty((), dtype=torch.int32, device=work.device)
        torch.linalg.cholesky_ex(U, out=(U, info))
        if int(info) == 0:
            torch.cholesky_inverse(U, out=U)
            torch.linalg.cholesky_ex(U, upper=True, out=(U, info))
            if int(info) == 0 and all(bool(torch.isfinite(U[r0:r1]).all()) for r0, r1 in row_blocks(U.shape[0])):
                return U, dtype
        return None, dtype  # the failed copy is freed before the next build()

    U, lam, retries = with_damping(factorize, damp, what, max_retries=max_retries, growth=growth)
    return U, lam, retries, mean_diag


def with_damping(
    factorize: Callable[[float, int], _T | None], damp: float, what: str, *, max_retries: int = 6, growth: float = 10.0
) -> tuple[_T, float, int]:
    """The damping escalation shared by the Cholesky factorizations of a Hessian: ``factorize(lam, attempt)``
    with ``lam = damp`` first, and after each failure (``None``) with ``lam`` multiplied by ``growth`` (``1e-6``
    after ``0``), up to ``max_retries`` times, with a logged warning naming ``what`` each time. Returns
    ``(result, lam_used, retries)``; raises ``ValueError`` when every attempt fails."""
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    lam = damp
    for attempt in range(max_retries + 1):
        result = factorize(lam, attempt)
        if result is not None:
            return result, lam, attempt
        if attempt < max_retries:
            new_lam = lam * growth if lam > 0 else 1e-6
            logger.warning(
                "Cholesky factorization of %s failed at damp=%.3g; retrying with damp=%.3g", what, lam, new_lam
            )
            lam = new_lam
    raise ValueError(
        f"{what} could not be factorized even with damp={lam:.3g} after {max_retries} retries; "
        f"check the calibration data (is {what} symmetric positive semi-definite?)"
    )
