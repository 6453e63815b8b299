"""bpdq/solvers/gptq.py: the GPTQ column sweep with lazy blocks and per-group grid parameters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bpdq
from bpdq.grids import BitPlaneGrid, UniformGrid
from bpdq.grids.base import round_coeffs
from bpdq.solvers import GPTQ, RTN
from tests.solvers.cases import correlated_hessian, heavy_weight
from tests.strategies import grouped_weights, low_bits, seeds


@given(data=grouped_weights(max_rows=4, max_groups=3, group_size=st.sampled_from([32, 64])), bits=low_bits,
       symmetric=st.booleans(), seed=seeds, order=st.sampled_from(["none", "gar"]))
def test_diagonal_hessian_makes_gptq_equal_rtn(data, bits, symmetric, seed, order):
    w, g = data
    diag = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(seed)) + 0.1
    grid = UniformGrid(bits=bits, symmetric=symmetric)
    q = GPTQ(order=order, block_size=64)(w, torch.diag(diag), grid, g)
    r = RTN()(w, None, grid, g)
    assert torch.equal(q.planes, r.planes)
    assert torch.equal(q.coeffs, r.coeffs)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlated_hessian_gptq_beats_rtn(bits, seed):
    W = heavy_weight(16, 256, seed)
    H = correlated_hessian(256, seed)
    grid = UniformGrid(bits=bits)
    q = GPTQ()(W, H, grid, 64)
    r = RTN()(W, H, grid, 64)
    assert q.stats.proxy_loss < r.stats.proxy_loss
    assert 0 < q.stats.relative_loss < 1


def test_bitplane_grid_sweeps_with_the_initial_coefficients():
    W = heavy_weight(8, 64, 3)
    H = correlated_hessian(64, 3)
    grid = BitPlaneGrid(planes=2)
    q = GPTQ(order="none")(W, H, grid, 64)
    # a single group: its coefficients are the grid's initial fit of the (untouched) first-column weights
    expected = round_coeffs(grid.init(W))
    torch.testing.assert_close(q.coeffs[0].T.float(), expected, rtol=0, atol=0)
    assert q.stats.proxy_loss < RTN(refits=0)(W, H, grid, 64).stats.proxy_loss


def test_block_size_changes_only_rounding():
    W = heavy_weight(8, 256, 4).double()
    H = correlated_hessian(256, 4).double()
    grid = UniformGrid(bits=3)
    a = GPTQ(block_size=64)._solve(W.clone(), H, grid, 32)
    b = GPTQ(block_size=256)._solve(W.clone(), H, grid, 32)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_gptq_options_and_inputs_are_validated():
    assert bpdq.SOLVERS.get("gptq") is GPTQ and GPTQ.requires_hessian
    assert GPTQ().options.order.value == "gar" and GPTQ().options.block_size == 128
    with pytest.raises(ValueError, match="'none' or 'gar'"):
        GPTQ(order="act_order")
    with pytest.raises(ValueError, match="damp"):
        GPTQ(damp=-1)
    with pytest.raises(ValueError, match="blocksize"):
        GPTQ(blocksize=64)
    W = torch.randn(4, 64)
    with pytest.raises(ValueError, match="needs a Hessian"):
        GPTQ()(W, None, UniformGrid(bits=2), 32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        GPTQ()(W, torch.full((64, 64), float("nan")), UniformGrid(bits=2), 32)
    with pytest.raises(ValueError, match=r"\[64, 64\]"):
        GPTQ()(W, torch.eye(32), UniformGrid(bits=2), 32)


def test_gptq_stats_record_damping_and_order():
    W = heavy_weight(4, 64, 5)
    q = GPTQ(order="none")(W, correlated_hessian(64, 5), UniformGrid(bits=2), 32)
    assert q.stats.extra["damp"] == 0.01 and q.stats.extra["order"] == "none"
    assert q.stats.extra["dead_inputs"] == 0 and q.stats.time_s > 0
    assert q.solver == {"type": "gptq", "damp": 0.01, "block_size": 128, "order": "none", "refit": "none"}
