"""Asymmetric calibration (GPTAQ-style): fit ``Q`` so the quantized model's input reproduces the
full-precision output.

A linear layer's target is ``W x_fp`` (the full-precision model on full-precision inputs) while, in the
quantized model, it sees ``x_q`` (inputs carrying the errors of the layers quantized before it). With
``S = sum_t x_q x_q^T`` and ``C = sum_t x_fp x_q^T``:

    sum_t ||W x_fp,t - Q x_q,t||^2 = tr((W~ - Q) S (W~ - Q)^T) + const,    W~ S = W C

so any Hessian-based solver, given ``W~`` and ``H_q = 2/n S`` instead of ``W`` and ``H``, minimises the
asymmetric objective. ``W~`` is computed as a *correction* of ``W``:

    W~ = W + W (C - S) (S + lam * mean(diag S) I)^-1

which equals ``W C S^-1`` without damping, and equals ``W`` exactly when ``x_fp == x_q`` (``C - S = 0``)
whatever the damping, so the symmetric case is untouched. The damping plays the role it plays in GPTQ:
directions the quantized inputs never excite get no correction. The solve is a float64 Cholesky of the
damped ``S`` (retried with 10x more damping if it fails, like :func:`inverse_cholesky`).

For a linear with fewer outputs than inputs (``down_proj``) ``W C`` is accumulated directly as
``P = sum_t y_fp,t x_q,t^T`` with ``y_fp = W x_fp`` (the full-precision linear's output, which the
full-precision stream computes anyway): an ``[out, in]`` product instead of ``[in, in]`` (0.375 of the
multiply-adds on SmolLM2's ``down_proj``), and :func:`asymmetric_target_projected` gives
``W~ = W + (P - W S) (S + lam * mean(diag S) I)^-1``, the same target up to float rounding.

Memory: the accumulator holds two ``[in, in]`` matrices (or ``[in, in]`` and ``[out, in]``); the layer loop must also keep the full-precision
activations beside the quantized ones (twice the calibration activations of one layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bpdq.solvers.hessian import HessianAccumulator, check_hessian, with_damping


class AsymmetricAccumulator:
    """Streaming ``H_q = 2/n sum x_q x_q^T`` and ``C = 2/n sum x_fp x_q^T`` (the scaling of
    :class:`~bpdq.solvers.hessian.HessianAccumulator`) from pairs of batches of equal shape ``[..., in]``."""

    def __init__(
        self, in_features: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
        out_features: int | None = None,
    ) -> None:
        """``out_features``: accumulate ``P = 2/n sum y_fp x_q^T`` (``y_fp`` the full-precision linear's
        outputs, given to :meth:`add`) instead of ``C`` (see the module docstring)."""
        if out_features is not None and (not isinstance(out_features, int) or out_features <= 0):
            raise ValueError(f"out_features must be a positive int or None, got {out_features!r}")
        self._hq = HessianAccumulator(in_features, dtype=dtype, device=device)
        self._device = device
        self.out_features = out_features
        self._cross: torch.Tensor | None = None
        self.identical = True  # every batch so far had x_fp == x_q exactly

    @property
    def in_features(self) -> int:
        return self._hq.in_features

    @property
    def n(self) -> int:
        return self._hq.n

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
        d = self.in_features
        rows = d if self.out_features is None else self.out_features
        if self._cross is None:
            dev = self._device if self._device is not None else x_q.device
            self._cross = torch.zeros(rows, d, dtype=self._hq.dtype, device=dev)
        self.identical = self.identical and torch.equal(x_q, x_fp)
        q = x_q.detach().reshape(-1, d).to(device=self._cross.device, dtype=self._cross.dtype)
        f = (x_fp if y_fp is None else y_fp).detach().reshape(-1, rows).to(device=self._cross.device, dtype=self._cross.dtype)
        with torch.autocast(q.device.type, enabled=False):  # in the accumulator's dtype inside an autocast pass
            self._cross.addmm_(f.T, q)

    @property
    def hessian(self) -> torch.Tensor:
        """``H_q = 2/n sum x_q x_q^T``."""
        return self._hq.hessian

    @property
    def cross(self) -> torch.Tensor:
        """``C = 2/n sum x_fp x_q^T`` (``P = 2/n sum y_fp x_q^T`` with ``out_features``)."""
        if self._cross is None:
            raise ValueError("no calibration inputs were accumulated; the cross-covariance is undefined")
        C = self._cross * (2.0 / self.n)
        if not torch.isfinite(C).all():
            raise ValueError("the accumulated cross-covariance contains NaN or Inf values (non-finite inputs?)")
        return C


def asymmetric_target(
    W: torch.Tensor, H_q: torch.Tensor, C: torch.Tensor, damp: float = 0.01, *, max_retries: int = 6
) -> torch.Tensor:
    """``W~ = W + W (C - H_q) (H_q + damp * mean(diag H_q) I)^-1`` in ``W``'s dtype (see the module docstring).

    ``H_q`` and ``C`` must come with the same scaling (as :class:`AsymmetricAccumulator` gives them).
    """
    return asymmetric_targets([W], H_q, C, damp, max_retries=max_retries)[0]


def asymmetric_targets(
    weights: Sequence[torch.Tensor], H_q: torch.Tensor, C: torch.Tensor, damp: float = 0.01, *, max_retries: int = 6
) -> list[torch.Tensor]:
    """:func:`asymmetric_target` of each of ``weights`` (linears that read the same inputs, e.g. q/k/v),
    with ``H_q`` factorised once: each result has the same bits as its own :func:`asymmetric_target`."""
    for W in weights:
        if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
            raise ValueError("W must be a 2-D floating-point torch.Tensor [out, in]")
    if not weights:
        return []
    d = weights[0].shape[1]
    if any(W.shape[1] != d for W in weights):
        raise ValueError(f"weights must share in_features, got {[W.shape[1] for W in weights]}")
    check_hessian(H_q, d)
    _check_moment("C", C, (d, d), "H_q", damp)
    S = H_q.to(torch.float64)
    delta = C.to(torch.float64) - S
    if not bool(delta.any()):
        return [W.clone() for W in weights]
    del S
    L = _damped_cholesky(H_q, damp, max_retries)
    out = []
    for W in weights:  # correction^T = S_lam^-1 (W delta)^T   (S_lam symmetric)
        corr = torch.cholesky_solve((W.to(torch.float64) @ delta).T, L).T
        out.append((W.to(torch.float64) + corr).to(W.dtype))
    return out


def asymmetric_target_projected(
    W: torch.Tensor, H_q: torch.Tensor, P: torch.Tensor, damp: float = 0.01, *, max_retries: int = 6
) -> torch.Tensor:
    """``W~ = W + (P - W H_q) (H_q + damp * mean(diag H_q) I)^-1`` in ``W``'s dtype, with ``P = W C`` as
    :class:`AsymmetricAccumulator` with ``out_features`` gives it (the same scaling as ``H_q``)."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError("W must be a 2-D floating-point torch.Tensor [out, in]")
    check_hessian(H_q, W.shape[1])
    _check_moment("P", P, tuple(W.shape), "W", damp)
    W64 = W.to(torch.float64)
    delta = P.to(torch.float64) - W64 @ H_q.to(torch.float64)
    L = _damped_cholesky(H_q, damp, max_retries)
    return (W64 + torch.cholesky_solve(delta.T, L).T).to(W.dtype)


def _check_moment(name: str, M: torch.Tensor, shape: tuple[int, ...], like: str, damp: float) -> None:
    if not isinstance(M, torch.Tensor) or tuple(M.shape) != shape:
        raise ValueError(f"{name} must be a {list(shape)} torch.Tensor like {like}, got {getattr(M, 'shape', type(M).__name__)}")
    if not torch.isfinite(M).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")


def _damped_cholesky(H_q: torch.Tensor, damp: float, max_retries: int) -> torch.Tensor:
    """The float64 lower Cholesky factor of ``H_q + damp * mean(diag H_q) I`` (damping raised 10x on failure).

    The damping goes onto the diagonal of one float64 copy of ``H_q`` (restored from the saved diagonal before
    each retry): two ``[d, d]`` matrices at a time, the copy and the factor, and the bits of ``S + lam I``
    (adding ``0.0`` turns an entry ``-0.0`` into ``+0.0`` as that sum does off the diagonal)."""
    S = H_q.to(torch.float64, copy=True).add_(0.0)
    scale = float(torch.diagonal(S).mean())
    diag = torch.diagonal(S).clone()

    def factorize(lam: float, attempt: int) -> torch.Tensor | None:
        torch.diagonal(S).copy_(diag).add_(lam * scale)
        L, info = torch.linalg.cholesky_ex(S)
        return L if int(info) == 0 else None

    return with_damping(factorize, damp, "H_q", max_retries=max_retries)[0]
