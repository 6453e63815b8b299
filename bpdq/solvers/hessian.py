"""Hessian tools of the GPTQ family: streaming accumulation of ``H = 2/n * sum x x^T``."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Streaming ``H = 2/n * sum_t x_t x_t^T`` over batches of any leading shape ``[..., in_features]``.

    Accumulates in float32 by default (``dtype=torch.float64`` for extra precision) on ``device`` (the
    inputs' device when ``None``).
    """

    def __init__(self, in_features: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        if not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.in_features = in_features
        self.dtype = dtype
        self.device = device
        self._sum: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"inputs must end in in_features={self.in_features}, got shape {tuple(x.shape)}")
        x2 = x.detach().reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return
        if self._sum is None:
            dev = self.device if self.device is not None else x2.device
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=dev)
        x2 = x2.to(device=self._sum.device, dtype=self.dtype)
        self._sum.addmm_(x2.T, x2)
        self.n += x2.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        if self._sum is None or self.n == 0:
            raise ValueError("no calibration inputs were accumulated; the Hessian is undefined")
        return self._sum * (2.0 / self.n)
