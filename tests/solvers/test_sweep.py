"""bpdq/solvers/sweep.py: layer preparation and the proxy loss from the sweep's errors."""

from __future__ import annotations

import pytest
import torch

import bpdq.solvers.base
import bpdq.solvers.sweep
from bpdq.grids import BitPlaneGrid, UniformGrid
from bpdq.solvers import BPDQ, GPTQ, bpdq_sweep, fix_dead_inputs, gptq_sweep, inverse_cholesky, prepare_layer, restore_order
from bpdq.solvers.ordering import column_permutation
from bpdq.solvers.sweep import SWEEP_LOSS_MIN_DAMP, sweep_proxy_loss
from tests.solvers.cases import correlated_hessian, heavy_weight


def _loss64(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    D = W.to(torch.float64) - Q.to(torch.float64)
    return float(((D @ H.to(torch.float64)) * D).sum())


@pytest.mark.parametrize("order, dead, damp", [("gar", 0, 0.01), ("none", 3, 0.01), ("gar", 6, 0.1), ("gar", 2, 1e-3)])
def test_sweep_errors_give_the_loss_under_the_undamped_hessian(order, dead, damp):
    W, H = heavy_weight(16, 512, 5), correlated_hessian(512, 5)
    idx = torch.randperm(512, generator=torch.Generator().manual_seed(1))[:dead]
    H[idx, :] = 0.0
    H[:, idx] = 0.0
    layer = prepare_layer(W.clone(), H, 64, order, damp)
    assert int(layer.dead.sum()) == layer.n_dead == dead and layer.loss_from_errors
    assert (layer.perm is None) == (order == "none")
    grid = UniformGrid(bits=2)
    codes, coeffs, errors = gptq_sweep(layer.W, layer.U, grid, 64, 128)
    assert errors.scaled.dtype == errors.residual.dtype == torch.float64 and errors.scaled.shape == (512,)
    codes, coeffs, _ = restore_order(codes, coeffs, layer.perm, 64)
    Q = torch.cat([grid.dequant(codes[:, a : a + 64], coeffs[:, a // 64]) for a in range(0, 512, 64)], 1)
    exact = _loss64(W, Q, H)
    assert sweep_proxy_loss(layer, errors) == pytest.approx(exact, rel=1e-5)
    # what the sweep factorised: the dead-fixed Hessian plus damping, seen by the prepared (dead-zeroed) weight
    Hd = H.clone().double()
    Hd[idx, idx] = 1.0
    Hd += layer.damp * layer.mean_diag * torch.eye(512, dtype=torch.float64)
    Wp = W.clone()
    Wp[:, idx] = 0.0
    assert float(errors.scaled.sum()) == pytest.approx(_loss64(Wp, Q, Hd), rel=1e-5)


def test_statistics_take_no_extra_pass_over_the_hessian_unless_damping_is_tiny(monkeypatch):
    """GPTQ (from its sweep) and refitting solvers (from the refit) report the loss themselves; the explicit
    formula in ``Solver.__call__`` is only the fallback (damping below ``SWEEP_LOSS_MIN_DAMP``, BPDQ without
    refit, a Hessian whose dead inputs are not isolated)."""
    calls = []
    explicit = bpdq.solvers.base.proxy_loss
    monkeypatch.setattr(bpdq.solvers.base, "proxy_loss", lambda *a: calls.append(1) or explicit(*a))
    W, H = heavy_weight(8, 128, 2), correlated_hessian(128, 2)
    GPTQ()(W, H, UniformGrid(bits=2), 32)
    GPTQ(refit="full")(W, H, BitPlaneGrid(planes=2), 32)
    BPDQ(iters=1)(W, H, BitPlaneGrid(planes=2), 32)
    assert calls == []
    qw = GPTQ(damp=SWEEP_LOSS_MIN_DAMP / 2)(W, H, UniformGrid(bits=2), 32)
    assert calls == [1] and qw.stats.proxy_loss == pytest.approx(_loss64(W, qw.dequantize(torch.float64), H), rel=1e-5)
    BPDQ(iters=1, refit="none")(W, H, BitPlaneGrid(planes=2), 32)
    assert calls == [1, 1]
    # a zero diagonal entry with non-zero off-diagonal ones (H not PSD): the dead-input terms do not apply
    H[5, 5] = 0.0
    layer = prepare_layer(W, H, 32, "gar", 0.01)
    assert layer.n_dead == 1 and not layer.loss_from_errors
    qw = GPTQ()(W, H, UniformGrid(bits=2), 32)
    assert calls == [1, 1, 1] and qw.stats.proxy_loss == pytest.approx(_loss64(W, qw.dequantize(torch.float64), H), rel=1e-5)


@pytest.mark.parametrize("order, dead", [("gar", 0), ("gar", 4), ("none", 3)])
def test_prepare_layer_equals_fixing_permuting_and_factorising_copies(order, dead):
    """One working copy (built in blocks of rows) gives the same bits as the separate steps, and ``H`` is
    left as it was."""
    W, H = heavy_weight(8, 320, 3), correlated_hessian(320, 3)
    idx = torch.randperm(320, generator=torch.Generator().manual_seed(2))[:dead]
    H[idx, :] = 0.0
    H[:, idx] = 0.0
    before = H.clone()
    layer = prepare_layer(W, H, 64, order, 0.01)
    W2, H2, n_dead = fix_dead_inputs(W, H)
    perm = column_permutation(order, torch.diagonal(H2), 64)
    if perm is not None:
        W2, H2 = W2[:, perm], H2[perm][:, perm]
    U, used, retries = inverse_cholesky(H2, 0.01)
    assert torch.equal(layer.U, U) and torch.equal(layer.W, W2) and layer.n_dead == n_dead == dead
    assert layer.mean_diag == float(torch.diagonal(H2).mean()) and (layer.damp, layer.retries) == (used, retries)
    assert torch.equal(H, before)


def test_sweeps_keep_one_byte_codes():
    W, H = heavy_weight(8, 128, 4), correlated_hessian(128, 4)
    layer = prepare_layer(W, H, 32, "gar", 0.01)
    codes, _, _ = gptq_sweep(layer.W.clone(), layer.U, UniformGrid(bits=3), 32, 64)
    res = bpdq_sweep(layer.W.clone(), layer.U, BitPlaneGrid(planes=2), 32, iters=2)
    assert codes.dtype == res.codes.dtype == torch.uint8
    assert int(codes.max()) < 8 and int(res.codes.max()) < 4


@pytest.mark.parametrize("solver", [GPTQ(), BPDQ(iters=2), GPTQ(order="none", damp=0.1)])
def test_a_factor_made_ahead_gives_the_same_solve(solver, monkeypatch):
    """``prefactor`` makes what the solve would factorise, bit for bit: a solve given it factorises nothing
    and stores the same codes, coefficients and statistics (dead inputs and the GAR order included)."""
    W, H = heavy_weight(24, 256, 3), correlated_hessian(256, 3)
    H[7, :] = H[:, 7] = 0.0  # a dead input
    grid = BitPlaneGrid(planes=2)
    plain = solver(W, H, grid, 64)
    factor = solver.prefactor(H, 64)
    assert solver.prefactors and factor.U.shape == (256, 256)
    calls = []
    monkeypatch.setattr(bpdq.solvers.sweep, "damped_inverse_cholesky", lambda *a, **k: calls.append(a))
    given = solver(W, H, grid, 64, factor=factor)
    assert not calls
    assert torch.equal(given.planes, plain.planes) and torch.equal(given.coeffs, plain.coeffs)
    assert given.stats.proxy_loss == plain.stats.proxy_loss and given.stats.extra == plain.stats.extra
    with pytest.raises(ValueError, match=r"a sweep factor of shape \(256, 256\) for a Hessian of shape \(128, 128\)"):
        prepare_layer(W[:, :128], H[:128, :128], 64, "gar", 0.01, factor=factor)
