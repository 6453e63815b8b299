"""bpdq/grids/base.py: the Grid template (validation, levels, snap, fit), ridge_lstsq and round_coeffs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from bpdq.bits import plane_matrix
from bpdq.grids import BitPlaneGrid, UniformGrid, ridge_lstsq, round_coeffs
from tests.strategies import bitplane_grids, seeds


def random_rows(seed: int, rows: int = 4, g: int = 32) -> torch.Tensor:
    return torch.randn(rows, g, generator=torch.Generator().manual_seed(seed))


@given(grid=bitplane_grids(), seed=seeds)
def test_snap_picks_the_nearest_level(grid, seed):
    """Generic sorted-threshold snap vs brute force over all levels, for arbitrary (even negative) coefficients."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 32, generator=gen) * 2
    coeffs = torch.randn(5, grid.planes + 1, generator=gen)
    codes = grid.snap(w, coeffs)
    assert codes.dtype == torch.int64 and codes.shape == w.shape
    assert codes.min() >= 0 and codes.max() < 2**grid.planes
    levels = grid.levels(coeffs)
    dist = (w.unsqueeze(-1) - levels.unsqueeze(1)).abs()  # [rows, g, 2^k]
    chosen = dist.gather(2, codes.unsqueeze(-1)).squeeze(-1)
    best = dist.min(-1).values
    # equal up to fp round-off in the mid-point thresholds (exact argmin can differ only at near-ties)
    assert torch.all(chosen <= best + 1e-6 * (1 + w.abs()))


def test_snap_ties_go_to_the_lower_level():
    grid = BitPlaneGrid(planes=1)
    coeffs = torch.tensor([[2.0, -1.0]])  # levels -1 (code 0) and 1 (code 1); midpoint 0
    assert grid.snap(torch.tensor([[0.0, 0.5, -0.5, 5.0, -5.0]]), coeffs).tolist() == [[0, 1, 0, 1, 0]]
    descending = torch.tensor([[-2.0, 1.0]])  # code 0 -> 1, code 1 -> -1: the lower level is code 1
    assert grid.snap(torch.tensor([[0.0]]), descending).tolist() == [[1]]


def test_levels_and_dequant_follow_the_plane_matrix():
    grid = BitPlaneGrid(planes=2)
    coeffs = torch.tensor([[1.0, 10.0, 100.0], [-1.0, 0.5, 0.0]])
    assert grid.levels(coeffs).tolist() == [[100.0, 101.0, 110.0, 111.0], [0.0, -1.0, 0.5, -0.5]]
    codes = torch.tensor([[3, 0, 2], [1, 1, 2]])
    assert grid.dequant(codes, coeffs).tolist() == [[111.0, 100.0, 110.0], [-1.0, -1.0, 0.5]]


def test_fit_matches_torch_lstsq():
    gen = torch.Generator().manual_seed(0)
    grid = BitPlaneGrid(planes=3)
    w = torch.randn(3, 32, generator=gen, dtype=torch.float64)
    codes = torch.randint(0, 8, (3, 32), generator=gen)
    got = grid.fit(w, codes)
    design = plane_matrix(3, dtype=torch.float64)[codes]
    expected = torch.linalg.lstsq(design, w.unsqueeze(-1)).solution.squeeze(-1)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_whitened_fit_equals_least_squares_on_transformed_data():
    gen = torch.Generator().manual_seed(1)
    grid = BitPlaneGrid(planes=2)
    w = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    codes = torch.randint(0, 4, (4, 16), generator=gen)
    A = torch.randn(16, 16, generator=gen, dtype=torch.float64) + 4 * torch.eye(16, dtype=torch.float64)
    got = grid.fit(w, codes, whiten=A)
    design = plane_matrix(2, dtype=torch.float64)[codes]  # [rows, g, k+1]
    expected = torch.linalg.lstsq(A @ design, (w @ A.T).unsqueeze(-1)).solution.squeeze(-1)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


def test_ridge_shrinks_coefficients_and_matches_closed_form():
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(1, 20, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(1, 20, generator=gen, dtype=torch.float64)
    alpha = 0.5
    gram = X[0].T @ X[0]
    lam = (alpha + 1e-12) * gram.diagonal().mean()
    expected = torch.linalg.solve(gram + lam * torch.eye(3, dtype=torch.float64), X[0].T @ y[0])
    got = ridge_lstsq(X, y, None, alpha)
    torch.testing.assert_close(got[0], expected)
    assert got.norm() < ridge_lstsq(X, y, None, 0.0).norm()


def test_ridge_survives_a_plane_constant_within_a_row():
    grid = BitPlaneGrid(planes=2)
    w = torch.linspace(-1, 1, 32).unsqueeze(0)
    codes = (w > 0).long()  # plane 1 is zero everywhere: singular normal matrix without the floor
    coeffs = grid.fit(w, codes)
    assert torch.isfinite(coeffs).all()
    err = (grid.dequant(codes, coeffs) - w).pow(2).sum()
    best = (grid.dequant(codes, torch.tensor([[1.0, 0.0, -0.5]])) - w).pow(2).sum()
    assert err <= best + 1e-5


def test_fit_keeps_the_input_dtype():
    w = random_rows(3)
    codes = BitPlaneGrid(planes=2).init_codes(w)
    assert BitPlaneGrid(planes=2).fit(w, codes).dtype == torch.float32
    assert BitPlaneGrid(planes=2).fit(w.double(), codes).dtype == torch.float64


def test_round_coeffs_rounds_to_fp16_and_keeps_dtype():
    c = torch.tensor([0.1, 1 / 3, 1000.123], dtype=torch.float64)
    r = round_coeffs(c)
    assert r.dtype == torch.float64
    assert torch.equal(r, c.to(torch.float16).to(torch.float64))
    assert round_coeffs(torch.empty(0)).numel() == 0


def test_round_coeffs_rejects_values_beyond_fp16():
    with pytest.raises(ValueError, match="exceeds the fp16 storage range"):
        round_coeffs(torch.tensor([1e6]))


@pytest.mark.parametrize("grid", [UniformGrid(bits=2), BitPlaneGrid(planes=2)], ids=["uniform", "bitplane"])
def test_grid_methods_validate_their_inputs(grid):
    w = random_rows(0)
    with pytest.raises(TypeError, match="w must be a torch.Tensor, got list"):
        grid.init([[1.0]])
    with pytest.raises(ValueError, match=r"w must be 2-D \[rows, group_size\], got shape \(32,\)"):
        grid.init(w[0])
    with pytest.raises(TypeError, match="w must be a floating-point tensor"):
        grid.init(w.long())
    with pytest.raises(ValueError, match=r"coeffs must be \[4, 3\], got \(4, 2\)"):
        grid.snap(w, torch.zeros(4, 2))
    codes = torch.zeros_like(w, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"codes shape \(4, 16\) must equal w shape \(4, 32\)"):
        grid.fit(w, codes[:, :16])
    with pytest.raises(ValueError, match=r"whiten must be \[32, 32\], got \(16, 16\)"):
        grid.fit(w, codes, whiten=torch.eye(16))
    with pytest.raises(ValueError, match="alpha must be >= 0, got -1"):
        grid.fit(w, codes, alpha=-1)
