"""bpdq/solvers/refit.py: the joint full-Hessian refit never raises the proxy loss and solves the right system."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bpdq.grids import BitPlaneGrid, UniformGrid
from bpdq.quantized import QuantizedWeight, dequantize_packed
from bpdq.solvers import BPDQ, GPTQ, RTN
from bpdq.solvers.refit import dequant_rows, design, refit_coefficients
from tests.solvers.cases import correlated_hessian, correlated_inputs, heavy_weight
from tests.strategies import DISTRIBUTIONS, codes_and_coeffs, make_weight, scales, seeds


def _loss64(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W-Q) H (W-Q)^T)`` in float64: the refit's guarantee is about the exact loss."""
    D = (W - Q).to(torch.float64)
    return float(((D @ H.to(torch.float64)) * D).sum())


def _solver_layout(qw):
    """``(codes [out, in], coeffs [out, groups, k+1] float32)`` of a QuantizedWeight."""
    return qw.codes(), qw.coeffs.permute(2, 0, 1).to(torch.float32)


@given(case=codes_and_coeffs())
def test_the_refit_losses_see_the_stored_model_bit_for_bit(case):
    """The refit compares rows by their losses under the stored (fp16-coefficient) model: its dequantization
    of the design matrix has the bits of the packed format's."""
    codes, coeffs, k, g = case
    stored = QuantizedWeight.from_codes(codes, coeffs, planes=k, group_size=g)
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(dequant_rows(design(codes, k, g), coeffs.to(dtype)), stored.dequantize(torch.float32))


@settings(max_examples=25, deadline=None)
@given(
    seed=seeds,
    k=st.integers(1, 4),
    dist=st.sampled_from(DISTRIBUTIONS),
    scale=scales,
    samples=st.sampled_from([8, 40, 400]),
    start=st.sampled_from(["rtn", "gptq", "bpdq"]),
)
def test_refit_never_raises_the_proxy_loss(seed, k, dist, scale, samples, start):
    """Any planes and coefficients, any (also rank-deficient) Hessian: the stored result's loss only drops."""
    W = make_weight(6, 96, dist, scale, seed)
    x = correlated_inputs(96, seed, samples=samples)
    H = 2 / samples * x.T @ x
    solver = {"rtn": RTN(), "gptq": GPTQ(), "bpdq": BPDQ(iters=2, refit="none")}[start]
    qw = solver(W, H, BitPlaneGrid(planes=k), 32)
    codes, coeffs = _solver_layout(qw)
    res = refit_coefficients(W, H, codes, coeffs, k, 32)
    assert torch.isfinite(res.coeffs).all()
    assert torch.equal(res.coeffs.to(torch.float16).to(torch.float32), res.coeffs)  # fp16-representable
    before = _loss64(W, qw.dequantize(torch.float64), H)
    Q = dequantize_packed(qw.planes, res.coeffs.permute(1, 2, 0).to(torch.float64), 32)  # fp16-exact values
    after = _loss64(W, Q, H)
    assert after <= before * (1 + 1e-12) + 1e-30
    assert res.loss_after <= res.loss_before
    # the refit's losses are float64 quadratic forms of W - Q with Q dequantized in float32 (the kernels'
    # arithmetic): its rounding leaves a floor of about 1e-14 tr(W H W^T) under which a loss that the refit
    # drove to almost nothing (a rank-deficient H) is not resolved; 1e-9 of the reference bounds that floor
    floor = 1e-9 * _loss64(W, torch.zeros_like(W), H) + 1e-30
    assert res.loss_before == pytest.approx(before, rel=1e-6, abs=floor)
    assert res.loss_after == pytest.approx(after, rel=1e-6, abs=floor)
    assert res.reference == pytest.approx(_loss64(W, torch.zeros_like(W), H), rel=1e-5)
    # rows that kept their coefficients kept them exactly
    kept = (res.coeffs == coeffs).all(2).all(1)
    assert int((~kept).sum()) <= res.rows_improved


def test_refit_solves_the_joint_normal_equations():
    """Without rounding and ridge, the solution is the dense per-row least squares over all groups."""
    from bpdq.solvers.refit import _solve_rows

    W, H = heavy_weight(5, 128, 1).double(), correlated_hessian(128, 1).double()
    qw = BPDQ(iters=2, refit="none")(W, H, BitPlaneGrid(planes=2), 32)
    codes, coeffs = _solver_layout(qw)
    V = design(codes, 2, 32)
    sol = _solve_rows((W.float() @ H.float()).view(5, 4, 32), H.float(), V, coeffs.double(), 0.0)
    D = torch.zeros(5, 128, 12, dtype=torch.float64)  # dense design: column (a, i)
    for a in range(4):
        for i in range(3):
            D[:, a * 32 : (a + 1) * 32, a * 3 + i] = V[:, i, a].double()
    gram = D.transpose(1, 2) @ H @ D
    rhs = D.transpose(1, 2) @ (W @ H).unsqueeze(-1)
    ref = torch.linalg.solve(gram, rhs).squeeze(-1).view(5, 4, 3)
    torch.testing.assert_close(sol, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("out, inp, k, seed", [(16, 256, 2, 0), (24, 192, 3, 1), (8, 384, 2, 2)])
def test_refit_lowers_the_loss_of_realistic_layers(out, inp, k, seed):
    W, H = heavy_weight(out, inp, seed), correlated_hessian(inp, seed)
    plain = BPDQ(refit="none")(W, H, BitPlaneGrid(planes=k), 64)
    refit = BPDQ(refit="full")(W, H, BitPlaneGrid(planes=k), 64)
    assert torch.equal(plain.planes, refit.planes)  # planes frozen
    assert refit.stats.proxy_loss < 0.995 * plain.stats.proxy_loss
    info = refit.stats.extra["refit"]
    # the refit's float64 losses are the solver's statistics; without a refit they come from Solver.__call__
    assert info["loss_before"] == pytest.approx(plain.stats.proxy_loss, rel=1e-5)
    assert info["loss_after"] == refit.stats.proxy_loss
    after, reference = _loss64(W, refit.dequantize(torch.float64), H), _loss64(W, torch.zeros_like(W), H)
    assert refit.stats.proxy_loss == pytest.approx(after, rel=1e-6)
    assert refit.stats.relative_loss == pytest.approx(after / reference, rel=1e-5)
    assert 0 < info["rows_improved"] <= info["rows"] == out


def test_gram_matrices_are_the_dense_design_products():
    """Built group by group over half the blocks and mirrored: equal to ``D^T H D`` of the dense design."""
    from bpdq.solvers.refit import gram_matrices

    for planes, groups, g in [(1, 3, 8), (2, 4, 16), (4, 2, 8)]:
        inp = groups * g
        H = correlated_hessian(inp, planes).float()
        V = design(torch.randint(0, 2**planes, (3, inp)), planes, g)
        D = torch.zeros(3, inp, groups * (planes + 1), dtype=torch.float64)
        for a in range(groups):
            for i in range(planes + 1):
                D[:, a * g : (a + 1) * g, a * (planes + 1) + i] = V[:, i, a].double()
        ref = D.transpose(1, 2) @ H.double() @ D
        torch.testing.assert_close(gram_matrices(V, H).double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_refit_chunks_give_the_same_result():
    W, H = heavy_weight(12, 128, 3), correlated_hessian(128, 3)
    codes, coeffs = _solver_layout(GPTQ()(W, H, BitPlaneGrid(planes=2), 32))
    whole = refit_coefficients(W, H, codes, coeffs, 2, 32)
    rowwise = refit_coefficients(W, H, codes, coeffs, 2, 32, chunk_bytes=1)  # one row per chunk
    torch.testing.assert_close(rowwise.coeffs, whole.coeffs, rtol=0, atol=2e-3 * float(whole.coeffs.abs().max()))
    assert rowwise.loss_after == pytest.approx(whole.loss_after, rel=1e-3)


def test_gptq_refit_needs_the_bitplane_grid_and_improves_it():
    W, H = heavy_weight(8, 128, 4), correlated_hessian(128, 4)
    with pytest.raises(ValueError, match="refit='full' needs the 'bitplane' grid"):
        GPTQ(refit="full")(W, H, UniformGrid(bits=2), 32)
    plain = GPTQ()(W, H, BitPlaneGrid(planes=2), 32)
    refit = GPTQ(refit="full")(W, H, BitPlaneGrid(planes=2), 32)
    assert refit.stats.proxy_loss < plain.stats.proxy_loss and refit.solver["refit"] == "full"


def test_refit_rejects_mismatched_inputs():
    W, H = heavy_weight(4, 64, 5), correlated_hessian(64, 5)
    codes = torch.zeros(4, 64, dtype=torch.int64)
    coeffs = torch.zeros(4, 2, 3)
    with pytest.raises(ValueError, match=r"codes must be \[4, 64\]"):
        refit_coefficients(W, H, codes[:, :32], coeffs, 2, 32)
    with pytest.raises(ValueError, match=r"coeffs must be \[4, 2, 3\]"):
        refit_coefficients(W, H, codes, coeffs[:, :1], 2, 32)
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        refit_coefficients(W, H, codes, coeffs, 2, 32, ridge=-1.0)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        refit_coefficients(W, -H, codes, coeffs, 2, 32)
    with pytest.raises(ValueError, match="refit"):
        BPDQ(refit="partial")
