"""bpdq/solvers/ordering.py: group-aware reordering (GAR) keeps group membership."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bpdq.solvers.ordering import Order, column_permutation, gar_permutation
from tests.strategies import seeds


@given(seed=seeds, g=st.sampled_from([8, 32]), groups=st.integers(1, 5), ties=st.booleans())
def test_gar_sorts_within_groups_and_orders_groups_by_their_largest_diagonal(seed, g, groups, ties):
    gen = torch.Generator().manual_seed(seed)
    diag = torch.rand(g * groups, generator=gen)
    if ties:
        diag = torch.round(diag * 3)  # many equal values
    perm = gar_permutation(diag, g)
    assert torch.equal(torch.sort(perm).values, torch.arange(g * groups))
    blocks = perm.view(groups, g)
    # membership: every sweep group is one original group
    assert torch.all(blocks // g == blocks[:, :1] // g)
    d = diag[blocks]
    assert torch.all(d[:, 1:] <= d[:, :-1])  # descending inside a group
    assert torch.all(d[1:, 0] <= d[:-1, 0])  # groups by their largest diag
    # ties keep the original order (stable)
    same = d[:, 1:] == d[:, :-1]
    assert torch.all(blocks[:, 1:][same] > blocks[:, :-1][same])


def test_constant_diagonal_gives_identity_and_none_gives_no_permutation():
    assert torch.equal(gar_permutation(torch.ones(64), 32), torch.arange(64))
    assert column_permutation("none", torch.rand(64), 32) is None
    assert column_permutation(Order.GAR, torch.rand(64), 32) is not None
    with pytest.raises(ValueError):
        column_permutation("act_order", torch.rand(64), 32)
    with pytest.raises(ValueError, match="divisible by group_size"):
        gar_permutation(torch.rand(60), 32)

