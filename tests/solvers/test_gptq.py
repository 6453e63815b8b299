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


@pytest.mark.parametrize("order", ["gar", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_released_hessian_is_freed_and_changes_nothing(order, dtype):
    """``release_hessian=True``: GPTQ frees the caller's Hessian once ``U`` exists (the pipeline's peak
    memory), with the same result and statistics as a solve that keeps it."""
    W, H = heavy_weight(16, 128, 3), correlated_hessian(128, 3).to(dtype)
    kept = GPTQ(order=order)(W, H, UniformGrid(bits=2), 32)
    assert H.untyped_storage().nbytes() > 0
    released = GPTQ(order=order)(W, H, UniformGrid(bits=2), 32, release_hessian=True)
    assert H.untyped_storage().nbytes() == 0  # the float64 original too, not only its float32 copy
    assert torch.equal(released.planes, kept.planes) and torch.equal(released.coeffs, kept.coeffs)
    assert released.stats.proxy_loss == kept.stats.proxy_loss
    assert released.stats.relative_loss == kept.stats.relative_loss


def test_a_hessian_still_needed_is_not_released():
    """A refit reads H after the sweep; below SWEEP_LOSS_MIN_DAMP the loss needs H's explicit formula; BPDQ's
    default refit reads it too: none of them frees it, and each still records its proxy loss."""
    from bpdq.solvers import BPDQ

    W = heavy_weight(8, 128, 4)
    for solver, grid in [(GPTQ(refit="full"), BitPlaneGrid(planes=2)), (GPTQ(damp=0.0), UniformGrid(bits=2)),
                         (BPDQ(iters=2), BitPlaneGrid(planes=2))]:
        H = correlated_hessian(128, 4)
        qw = solver(W, H, grid, 32, release_hessian=True)
        assert H.untyped_storage().nbytes() > 0 and torch.isfinite(H).all()
        assert qw.stats.proxy_loss is not None and qw.stats.proxy_loss > 0


def test_release_hessian_outside_an_allowed_solve_does_nothing_and_a_solver_that_releases_must_report_its_loss():
    from bpdq.solvers.base import Solver, release_hessian

    assert release_hessian() is False

    class Careless(Solver):
        requires_hessian = True

        def _solve(self, W, H, grid, group_size):
            release_hessian()
            codes, coeffs, stats = RTN()._solve(W, None, grid, group_size)
            return codes, coeffs, stats

    W, H = heavy_weight(4, 64, 5), correlated_hessian(64, 5)
    Careless()(W, H.clone(), UniformGrid(bits=2), 32)  # not allowed to release: H kept, loss from H
    with pytest.raises(RuntimeError, match="released the Hessian but left no proxy loss"):
        Careless()(W, H, UniformGrid(bits=2), 32, release_hessian=True)
