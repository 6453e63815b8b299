"""bpdq/solvers/fit.py: the batched whitened fit equals the grid's generic ridge fit."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from bpdq.grids import BitPlaneGrid
from bpdq.solvers.fit import WhitenedFit
from bpdq.solvers.hessian import inverse_cholesky
from tests.solvers.cases import correlated_hessian, heavy_weight
from tests.strategies import seeds


@given(seed=seeds, k=st.integers(1, 4), g=st.sampled_from([8, 32]), alpha=st.sampled_from([0.0, 1e-4, 0.1]))
def test_whitened_fit_equals_grid_fit(seed, k, g, alpha):
    H = correlated_hessian(g, seed).double()
    U, _, _ = inverse_cholesky(H, 0.01)
    whiten = torch.linalg.inv(U).T
    w = heavy_weight(6, g, seed).double()
    grid = BitPlaneGrid(planes=k)
    codes = torch.randint(0, 2**k, (6, g), generator=torch.Generator().manual_seed(seed))
    codes[0] = 0  # a row whose planes are all constant: only the ridge keeps it solvable
    fast = WhitenedFit(w, whiten, alpha, k)(codes)
    ref = grid.fit(w, codes, whiten=whiten, alpha=alpha)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-12)


def test_whitened_fit_of_a_row_subset_equals_those_rows_of_the_full_fit():
    H = correlated_hessian(32, 3).double()
    U, _, _ = inverse_cholesky(H, 0.01)
    w = heavy_weight(10, 32, 3).double()
    fit = WhitenedFit(w, torch.linalg.inv(U).T, 1e-4, 2)
    codes = torch.randint(0, 4, (10, 32), generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([1, 4, 9])
    torch.testing.assert_close(fit(codes[rows], rows), fit(codes)[rows], rtol=1e-12, atol=1e-14)
