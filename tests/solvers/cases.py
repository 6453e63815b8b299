"""Layer cases for solver tests and benchmarks: realistic correlated Hessians and heavy-tailed weights."""

from __future__ import annotations

import torch

from tests.strategies import student_t


def correlated_inputs(n: int, seed: int, *, samples: int | None = None, outliers: int = 2) -> torch.Tensor:
    """Calibration inputs ``[samples, n]``: heavy-ish noise mixed by a random matrix, plus a few outlier
    channels with large activations (as in LLM residual streams)."""
    gen = torch.Generator().manual_seed(seed)
    samples = samples if samples is not None else 4 * n
    z = student_t(samples, n, df=5.0, generator=gen)
    mix = torch.eye(n) + torch.randn(n, n, generator=gen) / n**0.5
    x = z @ mix
    x = x * (0.5 + torch.rand(n, generator=gen))  # uneven channel scales
    if outliers:
        idx = torch.randperm(n, generator=gen)[:outliers]
        x[:, idx] *= 8.0
    return x


def correlated_hessian(n: int, seed: int, *, samples: int | None = None, outliers: int = 2) -> torch.Tensor:
    """``H = 2/m X^T X`` of :func:`correlated_inputs` (float32 ``[n, n]``)."""
    x = correlated_inputs(n, seed, samples=samples, outliers=outliers)
    return 2.0 / x.shape[0] * (x.T @ x)


def heavy_weight(out: int, inp: int, seed: int) -> torch.Tensor:
    """Heavy-tailed weights (Student t, 3 degrees of freedom) with per-row scales, as in LLM layers."""
    gen = torch.Generator().manual_seed(seed + 7919)
    return student_t(out, inp, df=3.0, generator=gen) * (0.02 + 0.03 * torch.rand(out, 1, generator=gen))
