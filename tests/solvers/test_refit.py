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
    # the refit's old loss is a float32 product E H with float64 sums; its new loss is the old one plus the
    # gains computed in coefficient space (float32 Gram blocks), resolved to about 1e-5 of the old loss (seen:
    # 4.5e-5 at worst, where a rank-deficient H let the refit drive the loss to 1e-4 of the old one)
    floor = 1e-9 * _loss64(W, torch.zeros_like(W), H) + 1e-30
    assert res.loss_before == pytest.approx(before, rel=1e-5, abs=floor)
    assert res.loss_after == pytest.approx(after, rel=1e-5, abs=floor + 1e-4 * before)
    assert res.reference == pytest.approx(_loss64(W, torch.zeros_like(W), H), rel=1e-5)
    # rows that kept their coefficients kept them exactly
    kept = (res.coeffs == coeffs).all(2).all(1)
    assert int((~kept).sum()) <= res.rows_improved


def _dense_design(V: torch.Tensor) -> torch.Tensor:
    """``D_r [in, P]`` per row, float64, column ``(a, i)``."""
    R, p, G, g = V.shape
    D = torch.zeros(R, G * g, G * p, dtype=torch.float64)
    for a in range(G):
        for i in range(p):
            D[:, a * g : (a + 1) * g, a * p + i] = V[:, i, a].double()
    return D


def _float64_refit(W, H, codes, coeffs, k, g, ridge=1e-6):
    """The refit as the float64 literal: dense per-row normal equations with the ridge towards the old
    coefficients, solved in float64, fp16-rounded, kept where the exact loss drops."""
    R = W.shape[0]
    H64, W64 = H.double(), W.double()
    D = _dense_design(design(codes, k, g))
    gram = D.transpose(1, 2) @ H64 @ D
    c_old = coeffs.reshape(R, -1).double()
    lam = (ridge * gram.diagonal(dim1=1, dim2=2).mean(1)).clamp_min(1e-30)
    rhs = (D.transpose(1, 2) @ (W64 @ H64).unsqueeze(-1)).squeeze(-1) + lam.unsqueeze(1) * c_old
    sol = torch.linalg.solve(gram + lam.view(-1, 1, 1) * torch.eye(gram.shape[1], dtype=torch.float64), rhs)
    cand = sol.view(coeffs.shape).to(torch.float16).to(coeffs.dtype)
    def loss(c):
        return (((W64 - (D @ c.reshape(R, -1, 1).double()).squeeze(-1)) @ H64) * (W64 - (D @ c.reshape(R, -1, 1).double()).squeeze(-1))).sum(1)
    better = loss(cand) < loss(coeffs)
    return torch.where(better.view(-1, 1, 1), cand, coeffs), float(torch.where(better, loss(cand), loss(coeffs)).sum())


def test_refit_solves_the_joint_normal_equations():
    """Without ridge, the float32 solve is the dense per-row least squares over all groups (for the change
    from the old coefficients)."""
    from bpdq.solvers.refit import _solve_rows, gram_matrices

    W, H = heavy_weight(5, 128, 1).double(), correlated_hessian(128, 1).double()
    qw = BPDQ(iters=2, refit="none")(W, H, BitPlaneGrid(planes=2), 32)
    codes, coeffs = _solver_layout(qw)
    V = design(codes, 2, 32)
    D = _dense_design(V)
    E = W - dequant_rows(V, coeffs).double()
    y = (D.transpose(1, 2) @ (E @ H).unsqueeze(-1)).squeeze(-1)
    d = _solve_rows(gram_matrices(V, H.float()), y.float(), 0.0)
    gram = D.transpose(1, 2) @ H @ D
    ref = torch.linalg.solve(gram, y)
    # the loss the solution reaches, not its coefficients (ill-determined directions differ), is what counts
    def reached(x):
        return (x * (gram @ x.unsqueeze(-1)).squeeze(-1)).sum(1) - 2 * (x * y).sum(1)
    torch.testing.assert_close(reached(d), reached(ref), rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("out, inp, k, g, seed", [(32, 256, 2, 64, 0), (24, 192, 3, 32, 1), (16, 384, 2, 128, 2), (16, 128, 1, 32, 3)])
def test_refit_stays_close_to_the_float64_refit(out, inp, k, g, seed):
    """Float32 products and solves against the float64 literal: the layer's loss after the refit within
    1e-4 (relative), and the coefficients of at least 95% of the rows within 1e-2 of their largest
    magnitude (the rest: ill-determined directions, or the acceptance margin ``MIN_GAIN``)."""
    W, H = heavy_weight(out, inp, seed), correlated_hessian(inp, seed)
    codes, coeffs = _solver_layout(BPDQ(iters=2, refit="none")(W, H, BitPlaneGrid(planes=k), g))
    res = refit_coefficients(W, H, codes, coeffs, k, g)
    ref_coeffs, ref_loss = _float64_refit(W, H, codes, coeffs, k, g)
    assert res.loss_after == pytest.approx(ref_loss, rel=1e-4)
    scale = ref_coeffs.abs().amax((1, 2), keepdim=True)
    close = ((res.coeffs - ref_coeffs).abs() <= 1e-2 * scale).all(2).all(1)
    assert close.double().mean() >= 0.95


def test_rows_whose_float32_solve_fails_are_solved_in_float64():
    from bpdq.solvers.refit import _solve_rows

    A = torch.eye(6).expand(3, 6, 6).clone()
    A[1] = torch.ones(6, 6)  # singular: with no ridge float32 Cholesky fails; float64 LU too -> d = 0
    A[2, 0, 0] = -1.0  # indefinite: Cholesky fails, LU solves it
    y = torch.ones(3, 6)
    d = _solve_rows(A, y, 0.0)
    assert d.dtype == torch.float64
    torch.testing.assert_close(d[0], torch.ones(6, dtype=torch.float64))
    assert torch.isfinite(d).all()
    torch.testing.assert_close(d[2], torch.linalg.solve(A[2].double(), y[2].double()))


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


def test_refit_chunks_give_the_same_coefficients():
    """Rows are independent and never computed alone: any budget gives the same coefficients (the budget
    follows the free memory, which must not change a checkpoint)."""
    from bpdq.solvers.refit import row_bytes, row_chunks

    assert row_chunks(5, 1) == [(0, 2), (2, 5)] and row_chunks(9, 7) == [(0, 4), (4, 9)]
    assert row_chunks(8, 100) == [(0, 8)] and row_chunks(1, 0) == [(0, 1)]
    W, H = heavy_weight(13, 256, 3), correlated_hessian(256, 3)
    codes, coeffs = _solver_layout(GPTQ()(W, H, BitPlaneGrid(planes=2), 32))
    whole = refit_coefficients(W, H, codes, coeffs, 2, 32)
    assert whole.rows_improved > 0
    for rows in (0, 2, 3, 5, 12):
        part = refit_coefficients(W, H, codes, coeffs, 2, 32, chunk_bytes=rows * row_bytes(256, 2, 32))
        assert torch.equal(part.coeffs, whole.coeffs), rows
        # the loss is a float32 quadratic form per chunk: its rounding may follow the chunk on some CPUs
        assert part.loss_after == pytest.approx(whole.loss_after, rel=1e-6)


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


def test_the_chunk_follows_the_memory_budget():
    from bpdq.solvers.refit import CPU_BUDGET, memory_budget, row_bytes

    assert 0 < memory_budget(torch.device("cpu")) <= CPU_BUDGET
    # an 8B-shaped down_proj at k=2, g=64: over a hundred rows per chunk within the CPU budget
    assert CPU_BUDGET // row_bytes(14336, 2, 64) >= 100
