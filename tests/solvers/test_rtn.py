"""bpdq/solvers/rtn.py: round-to-nearest with a uniform grid, and with the bit-plane grid plus refits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bpdq
from bpdq.grids import BitPlaneGrid, UniformGrid
from bpdq.solvers import RTN, group_rows
from tests.strategies import grouped_weights, low_bits, make_weight


@given(data=grouped_weights(), bits=low_bits, symmetric=st.booleans())
def test_uniform_rtn_is_nearest_level_of_the_min_max_grid(data, bits, symmetric):
    w, g = data
    grid = UniformGrid(bits=bits, symmetric=symmetric)
    qw = RTN()(w, None, grid, g)
    rows = group_rows(w, g)
    coeffs = grid.init(rows)
    assert torch.equal(qw.codes(), grid.snap(rows, coeffs).view(w.shape))
    # error per weight: at most half a step for values inside the grid's range
    scale = coeffs[:, :1].expand_as(rows)
    levels = grid.levels(coeffs)
    inside = (rows >= levels.min(1, keepdim=True).values) & (rows <= levels.max(1, keepdim=True).values)
    err = (qw.dequantize().view_as(rows) - rows).abs()
    assert torch.all(err[inside] <= scale[inside] / 2 + 1e-6 * (rows.abs()[inside] + scale[inside]))


@given(data=grouped_weights(max_groups=2), planes=low_bits, refits=st.integers(1, 4))
def test_bitplane_refits_never_increase_any_rows_error(data, planes, refits):
    w, g = data
    grid = BitPlaneGrid(planes=planes)

    def row_errors(solver):
        q = solver(w, None, grid, g).dequantize()
        return (group_rows(q, g) - group_rows(w, g)).double().pow(2).sum(1)

    before = row_errors(RTN(refits=0))
    assert torch.all(row_errors(RTN(refits=refits)) <= before * (1 + 1e-6) + 1e-12)


def test_bitplane_rtn_without_refits_stores_the_rounded_init_fit():
    w = make_weight(4, 64, "normal", 1.0, seed=0)
    grid = BitPlaneGrid(planes=2)
    qw = RTN(refits=0)(w, None, grid, 32)
    rows = group_rows(w, 32)
    coeffs = grid.init(rows).half().float()
    assert torch.equal(qw.codes(), grid.snap(rows, coeffs).view(4, 64))
    assert torch.equal(qw.dequantize(), grid.dequant(grid.snap(rows, coeffs), coeffs).view(4, 64))


@pytest.mark.parametrize(("k", "g", "bound"), [(2, 64, 0.7), (3, 128, 0.75)])
def test_variable_grid_gains_on_heavy_tailed_weights(k, g, bound):
    """Student-t (df=3) weights: mean squared-error ratio bit-plane RTN / uniform RTN over 6 seeded layers.

    Measured (32x256 layers): mean 0.576 (k=2, g=64) and 0.630 (k=3, g=128) over these 6 seeds, 0.583 /
    0.634 over 20 seeds, worst single layer 0.61 / 0.70; the bounds leave margin. Not guaranteed per
    input (hypothesis finds rows where uniform wins).
    """
    ratios = []
    for seed in range(6):
        w = make_weight(32, 256, "student_t", 0.02, seed)
        e_uniform = (bpdq.quantize_weight(w, grid={"type": "uniform", "bits": k}, group_size=g).dequantize() - w)
        e_variable = (bpdq.quantize_weight(w, grid={"type": "bitplane", "planes": k}, group_size=g).dequantize() - w)
        ratios.append((e_variable.pow(2).sum() / e_uniform.pow(2).sum()).item())
    assert sum(ratios) / len(ratios) < bound


def test_rtn_ignores_the_hessian_but_reports_the_proxy_loss():
    w = make_weight(4, 64, "normal", 1.0, seed=1)
    H = torch.diag(torch.linspace(0.5, 2.0, 64))
    with_h = RTN()(w, H, BitPlaneGrid(planes=2), 32)
    without = RTN()(w, None, BitPlaneGrid(planes=2), 32)
    assert torch.equal(with_h.planes, without.planes) and torch.equal(with_h.coeffs, without.coeffs)
    D = (w - with_h.dequantize()).double()
    assert with_h.stats.proxy_loss == pytest.approx(float(((D @ H.double()) * D).sum()))
    assert 0 < with_h.stats.relative_loss < 1
    assert without.stats.proxy_loss is None


def test_result_metadata():
    qw = RTN(refits=1)(torch.randn(2, 32), None, BitPlaneGrid(planes=3), 32)
    assert qw.solver == {"type": "rtn", "refits": 1}
    assert qw.grid == {"type": "bitplane", "planes": 3, "init_bits": 8}
    assert qw.k == 3


def test_options_validation():
    assert RTN().options.refits == 2
    with pytest.raises(ValueError, match=r"refits: -1 is not in 0\.\.100"):
        RTN(refits=-1)


@pytest.mark.parametrize("grid", [BitPlaneGrid(planes=2), BitPlaneGrid(planes=3), UniformGrid(bits=2)], ids=["bp2", "bp3", "u2"])
def test_groups_solved_in_chunks_equal_one_solve(monkeypatch, grid):
    # the chunks bound the temporaries; groups are independent, so the bytes must not change (5 chunks of 7
    # group rows and a ragged one of 5 for 40 rows x 64 inputs at g = 16)
    import bpdq.solvers.rtn as rtn

    w = make_weight(40, 64, "normal", 0.02, seed=3)
    monkeypatch.setattr(rtn, "_CHUNK_WEIGHTS", 1 << 40)
    whole = RTN()(w, None, grid, 16)
    monkeypatch.setattr(rtn, "_CHUNK_WEIGHTS", 7 * 16)
    chunked = RTN()(w, None, grid, 16)
    assert torch.equal(whole.planes, chunked.planes) and torch.equal(whole.coeffs, chunked.coeffs)
