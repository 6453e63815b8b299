"""bpdq/grids/uniform.py: min-max affine grid in bit-plane form."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

import bpdq
from bpdq.grids import BitPlaneGrid, UniformGrid
from tests.strategies import seeds, uniform_grids, weights


@given(grid=uniform_grids(), w=weights())
def test_init_coefficients_are_uniform_and_fp16_exact(grid, w):
    coeffs = grid.init(w)
    k = grid.planes
    assert coeffs.shape == (w.shape[0], k + 1) and coeffs.dtype == torch.float32
    assert torch.equal(coeffs, coeffs.half().float())  # storage precision
    scale = coeffs[:, 0]
    assert torch.all(scale > 0)
    for i in range(k):
        assert torch.equal(coeffs[:, i], scale * 2**i)
    levels = grid.levels(coeffs)
    steps = levels.sort(dim=1).values.diff(dim=1)
    assert torch.equal(steps, scale.unsqueeze(1).expand_as(steps))  # evenly spaced, exactly


@given(grid=uniform_grids(), w=weights())
def test_snap_is_nearest_level_and_error_at_most_half_a_step_inside_the_range(grid, w):
    coeffs = grid.init(w)
    codes = grid.snap(w, coeffs)
    levels = grid.levels(coeffs)
    q = grid.dequant(codes, coeffs)
    scale = coeffs[:, :1]
    slack = 1e-6 * (w.abs() + scale)
    inside = (w >= levels.min(1, keepdim=True).values) & (w <= levels.max(1, keepdim=True).values)
    err = (q - w).abs()
    assert torch.all(err[inside] <= (scale / 2).expand_as(w)[inside] + slack[inside])
    # outside the range the nearest level is the extreme one
    best = (w.unsqueeze(-1) - levels.unsqueeze(1)).abs().min(-1).values
    assert torch.all(err <= best + slack)


@given(w=weights())
def test_asymmetric_range_covers_min_and_max_up_to_half_a_step(w):
    grid = UniformGrid(bits=3)
    coeffs = grid.init(w)
    levels = grid.levels(coeffs)
    scale = coeffs[:, 0]
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    # half a step from rounding the zero point, plus fp16 rounding of the scale (relative 2^-11, times the
    # 2^k - 1 steps of the range) and of the offset
    tol = scale * (0.5 + 2 * 8 * 2.0**-11) + 1e-6 * (lo.abs() + hi.abs())
    assert torch.all(levels.min(1).values <= lo + tol)
    assert torch.all(levels.max(1).values >= hi - tol)


def test_symmetric_grid_puts_zero_point_in_the_middle():
    grid = UniformGrid(bits=2, symmetric=True)
    w = torch.tensor([[-3.0, 1.0, 0.5, 0.0]])
    coeffs = grid.init(w)
    scale, zero = grid.scale_zero(coeffs)
    assert zero.item() == 2.0
    assert scale.item() == pytest.approx(2.0, rel=1e-3)  # 2 * amax / maxq
    assert grid.levels(coeffs).tolist() == [[-4.0, -2.0, 0.0, 2.0]]


def test_constant_zero_rows_get_a_nonzero_scale():
    grid = UniformGrid(bits=2)
    w = torch.zeros(2, 8)
    coeffs = grid.init(w)
    assert torch.all(coeffs[:, 0] == 1.0)
    assert torch.equal(grid.dequant(grid.snap(w, coeffs), coeffs), w)


@given(seed=seeds)
def test_scale_zero_inverts_coeffs_from_scale(seed):
    gen = torch.Generator().manual_seed(seed)
    grid = UniformGrid(bits=4)
    scale = torch.rand(5, generator=gen) + 0.1
    zero = torch.randint(0, 16, (5,), generator=gen).float()
    s, z = grid.scale_zero(grid.coeffs_from_scale(scale, zero))
    assert torch.equal(s, scale)
    torch.testing.assert_close(z, zero)


def test_fit_refits_scale_and_offset_by_least_squares_and_stays_uniform():
    gen = torch.Generator().manual_seed(0)
    grid = UniformGrid(bits=3)
    w = torch.randn(3, 64, generator=gen, dtype=torch.float64)
    codes = grid.snap(w, grid.init(w))
    coeffs = grid.fit(w, codes)
    design = torch.stack([codes.double(), torch.ones_like(w)], dim=-1)
    sol = torch.linalg.lstsq(design, w.unsqueeze(-1)).solution.squeeze(-1)  # [rows, 2]: scale, offset
    torch.testing.assert_close(coeffs[:, 0], sol[:, 0])
    torch.testing.assert_close(coeffs[:, -1], sol[:, 1])
    for i in range(3):
        torch.testing.assert_close(coeffs[:, i], coeffs[:, 0] * 2**i)
    # refit never worse than the min-max coefficients for the same codes
    before = (grid.dequant(codes, grid.init(w)) - w).pow(2).sum(1)
    after = (grid.dequant(codes, coeffs) - w).pow(2).sum(1)
    assert torch.all(after <= before + 1e-12)


def test_uniform_levels_are_a_subset_of_the_bitplane_family():
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    uni = UniformGrid(bits=2)
    coeffs = uni.init(w)
    assert torch.equal(BitPlaneGrid(planes=2).levels(coeffs), uni.levels(coeffs))


def test_planes_and_config():
    assert UniformGrid(bits=3).planes == 3
    assert UniformGrid(bits=3, symmetric=True).to_config() == {"type": "uniform", "bits": 3, "symmetric": True}
    assert UniformGrid().options.bits == 4


@pytest.mark.parametrize(
    "grid",
    [
        {"type": "uniform", "bits": 2},
        {"type": "uniform", "bits": 4, "symmetric": True},
        {"type": "bitplane", "planes": 2},
    ],
)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ranges_below_fp16_resolution_quantize_to_about_zero(grid, sign):
    """Regression: a scale that rounds to 0 in fp16 used to give NaN zero points and out-of-range codes."""
    w = sign * torch.rand(3, 64, generator=torch.Generator().manual_seed(0)) * 1e-8
    qw = bpdq.quantize_weight(w, grid=grid, group_size=32)
    q = qw.dequantize()
    assert torch.isfinite(q).all()
    assert (q - w).abs().max() <= w.abs().max()
