"""Asymmetric calibration (GPTAQ-style): fit ``Q`` so the quantized model's input reproduces the
full-precision output.

A linear layer's target is ``W x_fp`` (the full-precision model on full-precision inputs) while, in the
quantized model, it sees ``x_q`` (inputs carrying the errors of the layers quantized before it). With
``S = sum_t x_q x_q^T`` and ``C = sum_t x_fp x_q^T``:

    sum_t ||W x_fp,t - Q x_q,t||^2 = tr((W~ - Q) S (W~ - Q)^T) + const,    W~ S = W C

so any Hessian-based solver, given ``W~`` and ``H_q = 2/n S`` instead of ``W`` and ``H``, minimises the
asymmetric objective. ``W~`` is computed as a *correction* of ``W``:

    W~ = W + W D (S + lam * mean(diag S) I)^-1,    D = C - S = sum_t (x_fp,t - x_q,t) x_q,t^T

which equals ``W C S^-1`` without damping. :class:`AsymmetricAccumulator` sums ``D`` itself (float32
products of each batch, added in float64, like the Hessian): it is exactly zero when ``x_fp == x_q``, and
then ``W~ = W`` bit for bit whatever the damping, so the symmetric case is untouched. The damping plays the
role it plays in GPTQ: directions the quantized inputs never excite get no correction. The solve goes
through :func:`~bpdq.solvers.hessian.damped_inverse_cholesky`, the symmetric solvers' own factorisation:
``U`` with ``(S + lam I)^-1 = U^T U`` in ``H_q``'s dtype (a float32 failure is retried in float64, then
with 10x more damping), and ``W~ = W + ((W D) U^T) U``.

For a linear with fewer outputs than inputs (``down_proj``) ``W C`` is accumulated directly as
``P = sum_t y_fp,t x_q,t^T`` with ``y_fp = W x_fp`` (the full-precision linear's output, which the
full-precision stream computes anyway): an ``[out, in]`` product instead of ``[in, in]`` (0.375 of the
multiply-adds on SmolLM2's ``down_proj``), and ``W D = P - W S`` (:func:`asymmetric_target_projected`), the
same target up to float rounding.

Memory, counted in ``[in, in]`` float64 matrices: the accumulator holds ``D`` (one) and the Hessian's
upper triangle (a half); the correction ``W D`` is taken (``[out, in]``) and ``D`` freed, then the float32
``H_q`` (a half) is made and the upper triangle freed, and the factorisation works on one copy of ``H_q`` (a
half in float32, one when retried in float64). At most two are alive at any point.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bpdq.solvers.hessian import HessianAccumulator, check_hessian, damped_inverse_cholesky


class AsymmetricAccumulator:
    """Streaming ``H_q = 2/n sum x_q x_q^T`` and ``D = 2/n sum (x_fp - x_q) x_q^T`` (the scaling of
    :class:`~bpdq.solvers.hessian.HessianAccumulator`) from pairs of batches of equal shape ``[..., in]``;
    ``D``'s products are computed in ``dtype`` and summed in float64 (exactly zero for equal streams)."""

    def __init__(
        self, in_features: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
        out_features: int | None = None,
    ) -> None:
        """``out_features``: accumulate ``P = 2/n sum y_fp x_q^T`` (``y_fp`` the full-precision linear's
        outputs, given to :meth:`add`) instead of ``D`` (see the module docstring)."""
        if out_features is not None and (not isinstance(out_features, int) or out_features <= 0):
            raise ValueError(f"out_features must be a positive int or None, got {out_features!r}")
        self._hq = HessianAccumulator(in_features, dtype=dtype, device=device)
        self._device = device
        self.out_features = out_features
        self._moment: torch.Tensor | None = None  # float64 sum of D (or of P with out_features), unscaled
        self.identical = True  # every batch so far had x_fp == x_q exactly

    @property
    def in_features(self) -> int:
        return self._hq.in_features

    @property
    def n(self) -> int:
        return self._hq.n

    @n.setter
    def n(self, value: int) -> None:
        self._hq.n = value

    def add(self, x_q: torch.Tensor, x_fp: torch.Tensor, y_fp: torch.Tensor | None = None) -> None:
        """One batch of quantized-model inputs ``x_q`` and the full-precision inputs ``x_fp`` of the same
        tokens; with ``out_features``, also the full-precision linear's outputs ``y_fp = x_fp W^T``."""
        if not isinstance(x_fp, torch.Tensor) or not isinstance(x_q, torch.Tensor):
            raise TypeError("x_q and x_fp must be torch.Tensors")
        if x_fp.shape != x_q.shape:
            raise ValueError(f"x_fp shape {tuple(x_fp.shape)} must equal x_q shape {tuple(x_q.shape)} (the same tokens)")
        if self.out_features is not None:
            if not isinstance(y_fp, torch.Tensor) or y_fp.shape != (*x_fp.shape[:-1], self.out_features):
                raise ValueError(f"y_fp must be a tensor of shape {(*x_fp.shape[:-1], self.out_features)} "
                                 f"(the full-precision outputs), got {getattr(y_fp, 'shape', type(y_fp).__name__)}")
        elif y_fp is not None:
            raise ValueError("y_fp is only used by an accumulator made with out_features")
        before = self._hq.n
        self._hq.add(x_q)
        if self._hq.n == before:
            return
        d, dtype = self.in_features, self._hq.dtype
        rows = d if self.out_features is None else self.out_features
        if self._moment is None:
            dev = self._device if self._device is not None else x_q.device
            self._moment = torch.zeros(rows, d, dtype=torch.float64, device=dev)
        equal = torch.equal(x_q, x_fp)
        self.identical = self.identical and equal
        if equal and self.out_features is None:
            return  # x_fp - x_q = 0: nothing to add to D
        dev = self._moment.device
        q = x_q.detach().reshape(-1, d).to(device=dev, dtype=dtype)
        if self.out_features is None:
            f = x_fp.detach().reshape(-1, d).to(device=dev, dtype=dtype) - q
        else:
            f = y_fp.detach().reshape(-1, rows).to(device=dev, dtype=dtype)  # type: ignore[union-attr]
        with torch.autocast(dev.type, enabled=False):  # in the accumulator's dtype inside an autocast pass
            for r0, r1 in _row_ranges(rows, d):  # no [rows, in] temporary in ``dtype``
                self._moment[r0:r1].add_(f[:, r0:r1].T @ q)

    @property
    def sums(self) -> list[torch.Tensor]:
        """The float64 sums, in order, for a caller that combines accumulators in place over the ranks of a
        distributed run (as :attr:`~bpdq.solvers.hessian.HessianAccumulator.sums`; it then sets :attr:`n`):
        the Hessian's blocks, then ``D`` (or ``P``) by blocks of rows."""
        if self._moment is None:
            raise ValueError("no calibration inputs were accumulated on this rank; nothing to reduce")
        return [*self._hq.sums, *(self._moment[r0:r1] for r0, r1 in _row_ranges(self._moment.shape[0], self.in_features))]

    @property
    def hessian(self) -> torch.Tensor:
        """``H_q = 2/n sum x_q x_q^T``."""
        return self._hq.hessian

    @property
    def moment(self) -> torch.Tensor:
        """``D = 2/n sum (x_fp - x_q) x_q^T`` (``P = 2/n sum y_fp x_q^T`` with ``out_features``), float64."""
        if self._moment is None:
            raise ValueError("no calibration inputs were accumulated; the cross-covariance is undefined")
        M = self._moment * (2.0 / self.n)
        if not torch.isfinite(M).all():
            raise ValueError("the accumulated cross-covariance contains NaN or Inf values (non-finite inputs?)")
        return M

    @property
    def cross(self) -> torch.Tensor:
        """``C = H_q + D = 2/n sum x_fp x_q^T`` in the accumulator's dtype (``P`` with ``out_features``)."""
        M = self.moment
        if self.out_features is None:
            M.add_(self.hessian.to(torch.float64))
        return M.to(self._hq.dtype)

    def corrections(self, weights: Sequence[torch.Tensor], rows: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """``W D`` of each of ``weights`` (linears that read these inputs), ``[out, in]`` in the accumulator's
        dtype, for :func:`corrected_targets`; with ``out_features`` (one weight), ``P - W H_q``, computed in
        ``P``'s float64 storage from the Hessian's float64 sum (no ``[in, in]`` matrix made); ``rows``: the
        weight is those rows ``[r0, r1)`` of the linear's (``P``'s rows). The moment is released; the Hessian
        stays. All zero when every batch had ``x_fp == x_q`` (without ``out_features``)."""
        if self._moment is None:
            raise ValueError("no calibration inputs were accumulated; the cross-covariance is undefined")
        moment, self._moment = self._moment, None
        scale, dtype = 2.0 / self.n, self._hq.dtype
        if self.out_features is None:
            out = [_times(W, moment, scale, dtype) for W in weights]
        elif len(weights) != 1:
            raise ValueError("a projected accumulator corrects one weight")
        else:
            if rows is not None:
                moment = moment[rows[0]:rows[1]]
            moment.mul_(scale)
            self._hq.subtract_product_(moment, weights[0])
            out = [moment.to(dtype)]
            del moment
        if not all(bool(torch.isfinite(M).all()) for M in out):  # a non-finite moment gives non-finite products
            raise ValueError("the accumulated cross-covariance contains NaN or Inf values (non-finite inputs?)")
        return out


def aligned_rows(r0: int, r1: int, rows: int, width: int) -> tuple[int, int]:
    """The smallest run of whole :func:`_row_ranges` blocks of a ``[rows, width]`` matrix that covers rows
    ``[r0, r1)``: its products, block by block, are those of the whole matrix's blocks, bit for bit."""
    step = _row_ranges(rows, width)[0][1] if rows else 1
    return r0 // step * step, min(rows, -(-r1 // step) * step)


def _row_ranges(rows: int, width: int, elements: int = 1 << 22) -> list[tuple[int, int]]:
    """``[r0, r1)`` ranges of about ``elements`` entries (at most 384 rows) of a ``[rows, width]`` matrix."""
    step = max(1, min(384, elements // max(width, 1)))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _times(W: torch.Tensor, D: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale * W D`` in ``dtype``, multiplied in float64 a block of ``W``'s rows at a time."""
    out = torch.empty(W.shape, dtype=dtype, device=D.device)
    for r0, r1 in _row_ranges(W.shape[0], W.shape[1]):
        out[r0:r1] = (W[r0:r1].to(device=D.device, dtype=torch.float64) @ D).mul_(scale)
    return out


def _projected(W: torch.Tensor, P: torch.Tensor, scale: float, H_q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale * P - W H_q`` in ``dtype``, a block of ``W``'s rows at a time: ``W H_q`` multiplied in ``H_q``'s
    dtype (no float64 copy of ``H_q``), the difference taken in float64."""
    out = torch.empty(W.shape, dtype=dtype, device=P.device)
    H = H_q.to(P.device)
    for r0, r1 in _row_ranges(W.shape[0], W.shape[1]):
        WH = W[r0:r1].to(device=P.device, dtype=H.dtype) @ H
        out[r0:r1] = P[r0:r1] * scale - WH.to(torch.float64)
    return out


def _check_weights(weights: Sequence[torch.Tensor], H_q: torch.Tensor) -> int:
    """The shared ``in_features`` of ``weights`` (2-D floating-point tensors), ``H_q`` checked against it."""
    for W in weights:
        if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
            raise ValueError("W must be a 2-D floating-point torch.Tensor [out, in]")
    d = weights[0].shape[1]
    if any(W.shape[1] != d for W in weights):
        raise ValueError(f"weights must share in_features, got {[W.shape[1] for W in weights]}")
    check_hessian(H_q, d)
    return d


def corrected_targets(
    weights: Sequence[torch.Tensor], H_q: torch.Tensor, corrections: Sequence[torch.Tensor], damp: float = 0.01,
    *, max_retries: int = 6, in_place: bool = False, factor: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``W + M (H_q + damp * mean(diag H_q) I)^-1`` for each weight ``W`` and its correction ``M`` (``W D``:
    :meth:`AsymmetricAccumulator.corrections`), in ``W``'s dtype, with ``H_q`` factorised once
    (:func:`~bpdq.solvers.hessian.damped_inverse_cholesky`, in ``H_q``'s dtype; ``H_q`` is not modified).
    A weight whose correction is all zero is returned unchanged (a copy), and when all are, nothing is
    factorised. ``in_place``: each target is written into its weight, a block of rows at a time (the same
    bits; no ``[out, in]`` copy), and the weights themselves are returned. ``factor``: that factorisation
    made ahead (:func:`target_factor` of ``H_q``), used as it is."""
    if len(weights) != len(corrections):
        raise ValueError(f"{len(weights)} weights but {len(corrections)} corrections")
    if not weights:
        return []
    _check_weights(weights, H_q)
    for W, M in zip(weights, corrections):
        if not isinstance(M, torch.Tensor) or M.shape != W.shape:
            raise ValueError(f"a correction must have its weight's shape {tuple(W.shape)}, got {getattr(M, 'shape', None)}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    zero = [not any(bool(M[r0:r1].any()) for r0, r1 in _row_ranges(*M.shape)) for M in corrections]  # no [o, n] bool
    if all(zero):
        return [W if in_place else W.clone() for W in weights]
    if factor is not None and factor.shape != H_q.shape:
        raise ValueError(f"a factor of shape {tuple(factor.shape)} for H_q of shape {tuple(H_q.shape)}")
    U = factor if factor is not None else target_factor(H_q, damp, max_retries=max_retries)
    out = []
    for W, M, z in zip(weights, corrections, zero):
        target = W if in_place else W.clone()
        if not z:
            for r0, r1 in _row_ranges(W.shape[0], W.shape[1]):  # M (H_q + lam I)^-1 = M U^T U, by rows
                X = (M[r0:r1].to(device=U.device, dtype=U.dtype) @ U.mT) @ U
                target[r0:r1] = (W[r0:r1].to(torch.float64) + X.to(device=W.device, dtype=torch.float64)).to(W.dtype)
        out.append(target)
    return out


def target_factor(H_q: torch.Tensor, damp: float = 0.01, *, max_retries: int = 6) -> torch.Tensor:
    """``U`` with ``U^T U = (H_q + damp * mean(diag H_q) I)^-1``, as :func:`corrected_targets` factorises it
    (in ``H_q``'s dtype, float64 where that fails; ``H_q`` is not modified)."""
    return damped_inverse_cholesky(H_q.clone, damp, max_retries=max_retries, what="H_q", widen=True)[0]


def asymmetric_target(
    W: torch.Tensor, H_q: torch.Tensor, C: torch.Tensor, damp: float = 0.01, *, max_retries: int = 6
) -> torch.Tensor:
    """``W~ = W + W (C - H_q) (H_q + damp * mean(diag H_q) I)^-1`` in ``W``'s dtype (see the module docstring).

    ``H_q`` and ``C`` must come with the same scaling (as :class:`AsymmetricAccumulator` gives them). The run
    itself uses :meth:`AsymmetricAccumulator.corrections` and :func:`corrected_targets` (``D`` summed
    directly, with less memory).
    """
    return asymmetric_targets([W], H_q, C, damp, max_retries=max_retries)[0]


def asymmetric_targets(
    weights: Sequence[torch.Tensor], H_q: torch.Tensor, C: torch.Tensor, damp: float = 0.01, *, max_retries: int = 6
) -> list[torch.Tensor]:
    """:func:`asymmetric_target` of each of ``weights`` (linears that read the same inputs, e.g. q/k/v),
    with ``H_q`` factorised once: each result has the same bits as its own :func:`asymmetric_target`."""
    if not weights:
        return []
    d = _check_weights(weights, H_q)
    _check_moment("C", C, (d, d), "H_q", damp)
    delta = C.to(torch.float64) - H_q.to(torch.float64)
    corrections = [_times(W, delta, 1.0, H_q.dtype) for W in weights]
    del delta
    return corrected_targets(weights, H_q, corrections, damp, max_retries=max_retries)


def asymmetric_target_projected(
    W: torch.Tensor, H_q: torch.Tensor, P: torch.Tensor, damp: float = 0.01, *, max_retries: int = 6
) -> torch.Tensor:
    """``W~ = W + (P - W H_q) (H_q + damp * mean(diag H_q) I)^-1`` in ``W``'s dtype, with ``P = W C`` as
    :class:`AsymmetricAccumulator` with ``out_features`` gives it in :attr:`~AsymmetricAccumulator.cross`
    (the same scaling as ``H_q``)."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError("W must be a 2-D floating-point torch.Tensor [out, in]")
    check_hessian(H_q, W.shape[1])
    _check_moment("P", P, tuple(W.shape), "W", damp)
    M = _projected(W, P.to(torch.float64), 1.0, H_q, H_q.dtype)
    return corrected_targets([W], H_q, [M], damp, max_retries=max_retries)[0]


def _check_moment(name: str, M: torch.Tensor, shape: tuple[int, ...], like: str, damp: float) -> None:
    if not isinstance(M, torch.Tensor) or tuple(M.shape) != shape:
        raise ValueError(f"{name} must be a {list(shape)} torch.Tensor like {like}, got {getattr(M, 'shape', type(M).__name__)}")
    if not torch.isfinite(M).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
