"""Column ordering for the Hessian-aware sweep: ``none`` or group-aware reordering (GAR).

GAR sorts the columns inside each group by ``diag(H)`` (descending) and orders the groups by their largest
``diag(H)``. Group *membership* never changes, so a solver can store its result in the original column
order and inference needs no permutation.
"""

from __future__ import annotations

from enum import Enum

import torch


class Order(str, Enum):
    """Order in which a solver sweeps the columns."""

    NONE = "none"
    GAR = "gar"


def gar_permutation(diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """Permutation ``perm`` (``W[:, perm]`` is the sweep order) for group-aware reordering.

    Ties keep the original order (stable sorts), so a constant diagonal gives the identity.
    """
    if diag.dim() != 1 or diag.numel() % group_size:
        raise ValueError(f"diag must be 1-D with a length divisible by group_size {group_size}, got {tuple(diag.shape)}")
    d = diag.view(-1, group_size)
    within = torch.sort(d, dim=1, descending=True, stable=True).indices  # [groups, g]
    group_order = torch.sort(d.amax(dim=1), descending=True, stable=True).indices  # [groups]
    starts = (group_order * group_size).unsqueeze(1)
    return (starts + within[group_order]).reshape(-1)


def column_permutation(order: Order | str, diag: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """The sweep permutation for ``order`` (``None`` means the identity)."""
    order = Order(order)
    if order is Order.NONE:
        return None
    return gar_permutation(diag, group_size)

