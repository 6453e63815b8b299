"""bpdq/solvers/asymmetric.py: solving on W~ = W C H_q^-1 fits the full-precision outputs from quantized inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from bpdq.grids import BitPlaneGrid
from bpdq.solvers import BPDQ, GPTQ, HessianAccumulator
from bpdq.solvers import asymmetric
from bpdq.solvers.asymmetric import (
    AsymmetricAccumulator,
    asymmetric_target,
    asymmetric_target_projected,
    asymmetric_targets,
    corrected_targets,
    target_factor,
)
from tests.solvers.cases import correlated_inputs, heavy_weight
from tests.strategies import seeds


def _pair(seed, n=96, tokens=800):
    """Full-precision inputs and the same tokens after earlier layers' quantization errors (structured + noise)."""
    gen = torch.Generator().manual_seed(seed + 1)
    x_fp = correlated_inputs(n, seed, samples=tokens, outliers=1).double()
    drift = torch.eye(n, dtype=torch.float64) + 0.15 * torch.randn(n, n, generator=gen, dtype=torch.float64) / n**0.5
    x_q = x_fp @ drift + 0.05 * torch.randn(tokens, n, generator=gen, dtype=torch.float64) * x_fp.std(0)
    return x_fp, x_q


def _output_error(W, qw, x_fp, x_q):
    Q = qw.dequantize(torch.float64)
    return float((x_fp @ W.double().T - x_q @ Q.T).pow(2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("solver", [GPTQ(), BPDQ(iters=3)])
def test_solving_on_the_asymmetric_target_lowers_the_true_output_error(seed, solver):
    x_fp, x_q = _pair(seed)
    W = heavy_weight(16, 96, seed).double()
    acc = AsymmetricAccumulator(96, dtype=torch.float64)
    for chunk in range(0, 800, 200):  # streaming, in batches of a leading shape [b, t, in]
        acc.add(x_q[chunk : chunk + 200].view(4, 50, 96), x_fp[chunk : chunk + 200].view(4, 50, 96))
    H_q, C = acc.hessian, acc.cross
    W_t = asymmetric_target(W, H_q, C)
    grid = BitPlaneGrid(planes=2)
    symmetric = solver(W, H_q, grid, 32)
    asymmetric = solver(W_t, H_q, grid, 32)
    assert _output_error(W, asymmetric, x_fp, x_q) < _output_error(W, symmetric, x_fp, x_q)


def test_the_target_minimises_the_unquantized_objective():
    """With Q free (no grid), argmin_Q sum ||W x_fp - Q x_q||^2 is W~ (no damping): check the normal equations."""
    x_fp, x_q = _pair(3, n=24, tokens=400)
    W = torch.randn(5, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    acc = AsymmetricAccumulator(24, dtype=torch.float64)
    acc.add(x_q, x_fp)
    W_t = asymmetric_target(W, acc.hessian, acc.cross, damp=0.0)
    ref = torch.linalg.lstsq(x_q, x_fp @ W.T).solution.T
    torch.testing.assert_close(W_t, ref, rtol=1e-7, atol=1e-9)


@settings(max_examples=10, deadline=None)
@given(seed=seeds)
def test_symmetric_inputs_leave_the_weight_unchanged(seed):
    x = correlated_inputs(32, seed % 1000, samples=100)
    W = heavy_weight(4, 32, seed % 1000)
    acc = AsymmetricAccumulator(32)
    acc.add(x, x)
    plain = HessianAccumulator(32)
    plain.add(x)
    assert torch.equal(acc.hessian, plain.hessian) and torch.equal(acc.cross, plain.hessian)
    assert torch.equal(asymmetric_target(W, acc.hessian, acc.cross, damp=0.01), W)


def test_bad_inputs_are_errors():
    acc = AsymmetricAccumulator(8)
    with pytest.raises(ValueError, match="undefined"):
        acc.cross
    with pytest.raises(ValueError, match="must equal x_q shape"):
        acc.add(torch.randn(3, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="in_features=8"):
        acc.add(torch.randn(3, 7), torch.randn(3, 7))
    x = torch.randn(20, 8)
    acc.add(x, x + 0.1)
    W = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"C must be a \[8, 8\]"):
        asymmetric_target(W, acc.hessian, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="damp must be >= 0"):
        asymmetric_target(W, acc.hessian, acc.cross, damp=-1.0)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        asymmetric_target(W, -acc.hessian, acc.cross)
    with pytest.raises(ValueError, match="must share in_features"):
        asymmetric_targets([W, torch.randn(2, 4)], acc.hessian, acc.cross)


def test_linears_that_share_inputs_factorise_h_q_once_with_the_same_bits(monkeypatch):
    x_fp, x_q = _pair(4, n=48, tokens=300)
    acc = AsymmetricAccumulator(48)
    acc.add(x_q.float(), x_fp.float())
    weights = [heavy_weight(rows, 48, rows) for rows in (8, 4, 4)]  # q, k, v
    each = [asymmetric_target(W, acc.hessian, acc.cross) for W in weights]
    calls = []
    factor = asymmetric.damped_inverse_cholesky
    monkeypatch.setattr(asymmetric, "damped_inverse_cholesky", lambda *a, **k: calls.append(1) or factor(*a, **k))
    shared = asymmetric_targets(weights, acc.hessian, acc.cross)
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(each, shared)) and not torch.equal(shared[0], weights[0])
    assert asymmetric_targets([], acc.hessian, acc.cross) == []


@pytest.mark.parametrize("seed", [0, 1])
def test_the_projected_target_equals_the_cross_moment_target(seed):
    """P = sum y_fp x_q^T with y_fp = W x_fp (out < in) gives the same W~ as C = sum x_fp x_q^T."""
    x_fp, x_q = _pair(seed, n=48, tokens=400)
    W = heavy_weight(12, 48, seed).double()
    full = AsymmetricAccumulator(48, dtype=torch.float64)
    projected = AsymmetricAccumulator(48, dtype=torch.float64, out_features=12)
    for chunk in range(0, 400, 100):
        xq, xf = x_q[chunk : chunk + 100], x_fp[chunk : chunk + 100]
        full.add(xq, xf)
        projected.add(xq, xf, xf @ W.T)
    assert projected.cross.shape == (12, 48) and not projected.identical
    torch.testing.assert_close(projected.cross, W @ full.cross, rtol=1e-9, atol=1e-9)
    expected = asymmetric_target(W, full.hessian, full.cross)
    torch.testing.assert_close(asymmetric_target_projected(W, projected.hessian, projected.cross), expected,
                               rtol=1e-8, atol=1e-10)


def test_a_projected_accumulator_needs_the_outputs_and_notices_identical_inputs():
    acc = AsymmetricAccumulator(8, out_features=3)
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match="y_fp must be a tensor of shape"):
        acc.add(x, x)
    with pytest.raises(ValueError, match="y_fp must be a tensor of shape"):
        acc.add(x, x, torch.randn(5, 4))
    acc.add(x, x, torch.randn(5, 3))
    assert acc.identical
    acc.add(x, x + 1.0, torch.randn(5, 3))
    assert not acc.identical
    with pytest.raises(ValueError, match="only used by an accumulator made with out_features"):
        AsymmetricAccumulator(8).add(x, x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="out_features must be a positive int"):
        AsymmetricAccumulator(8, out_features=0)
    with pytest.raises(ValueError, match="P must be a"):
        asymmetric_target_projected(torch.randn(3, 8), acc.hessian, torch.randn(8, 8))


def test_a_singular_h_q_is_damped_more_with_a_warning_and_an_impossible_one_is_an_error(caplog):
    """Fewer tokens than inputs: ``H_q`` is singular, the undamped factorisation fails and is retried at
    ``damp = 1e-6``, which gives ``W~`` of the explicitly damped formula; ``H_q`` itself is left as it was."""
    gen = torch.Generator().manual_seed(7)
    x_q = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    acc = AsymmetricAccumulator(16, dtype=torch.float64)
    acc.add(x_q, x_q + 0.1 * torch.randn(6, 16, generator=gen, dtype=torch.float64))
    H_q, C = acc.hessian, acc.cross
    before = H_q.clone()
    W = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    with caplog.at_level("WARNING"):
        W_t = asymmetric_target(W, H_q, C, damp=0.0)
    assert "Cholesky factorization of H_q failed at damp=0; retrying with damp=1e-06" in caplog.text
    damped = H_q + 1e-6 * H_q.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(W_t, W + torch.linalg.solve(damped, (W @ (C - H_q)).T).T, rtol=1e-6, atol=1e-8)
    assert torch.equal(H_q, before)
    indefinite = torch.ones(16, 16, dtype=torch.float64) * 2 - torch.eye(16, dtype=torch.float64)  # eigenvalue -1
    indefinite[0, 1:] = indefinite[1:, 0] = -2.0
    with pytest.raises(ValueError, match=r"H_q could not be factorized even with damp=0.1 after 1 retries"):
        asymmetric_target(W, indefinite, C, damp=0.01, max_retries=1)


def test_a_float32_factorisation_that_fails_is_retried_in_float64_at_the_same_damping(monkeypatch, caplog):
    """float32 ``H_q``: the factorisation runs in float32; where it fails, the same damping is tried in float64
    before the damping grows, and the target is the float64 one."""
    x_fp, x_q = _pair(5, n=32, tokens=200)
    acc = AsymmetricAccumulator(32)
    acc.add(x_q.float(), x_fp.float())
    W = heavy_weight(6, 32, 5)
    H_q, C = acc.hessian, acc.cross
    assert H_q.dtype == torch.float32
    factor, dtypes = torch.linalg.cholesky_ex, []

    def no_float32(A, *args, **kwargs):  # every float32 factorisation fails
        dtypes.append(A.dtype)
        L, info = factor(A, *args, **kwargs)
        if A.dtype == torch.float32:
            info.fill_(1)
        return L, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", no_float32)
    with caplog.at_level("WARNING"):
        W_t = asymmetric_target(W, H_q, C)
    assert "float32 Cholesky factorization of H_q failed at damp=0.01; retrying in float64" in caplog.text
    assert "retrying with damp" not in caplog.text and dtypes[0] == torch.float32 and torch.float64 in dtypes
    monkeypatch.undo()
    H64 = H_q.double()
    expected = asymmetric_target(W.double(), H64, C.double())
    torch.testing.assert_close(W_t, expected.float(), rtol=1e-5, atol=1e-6)


def test_the_projected_correction_is_read_from_the_hessian_sum_without_an_in_by_in_matrix():
    x_fp, x_q = _pair(6, n=900, tokens=300)  # 900 inputs: the Hessian's sum has several blocks of rows
    W = heavy_weight(10, 900, 6).double()
    acc = AsymmetricAccumulator(900, dtype=torch.float64, out_features=10)
    acc.add(x_q, x_fp, x_fp @ W.T)
    P, H_q = acc.cross, acc.hessian
    (M,) = acc.corrections([W])
    torch.testing.assert_close(M, P - W @ H_q, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="undefined"):
        acc.corrections([W])  # the moment is spent


def test_the_projected_correction_is_taken_a_block_of_rows_at_a_time_with_the_same_bits(monkeypatch):
    """``P - W H_q`` multiplies a block of ``out`` rows at a time when ``out`` rows exceed the product limit
    (no ``[out, in]`` float64 product), with the bits of one product over all rows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from bpdq.solvers import hessian

    class Products(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.mm.default:
                self.rows = max(self.rows, out.shape[0])
            return out

    x_fp, x_q = (x.float() for x in _pair(3, n=900, tokens=300))
    W = heavy_weight(64, 900, 3).float()
    accs = []
    for _ in range(2):
        acc = AsymmetricAccumulator(900, out_features=64)
        acc.add(x_q, x_fp, x_fp @ W.T)
        accs.append(acc)
    with Products() as whole_mode:
        (whole,) = accs[0].corrections([W])
    monkeypatch.setattr(hessian, "_PRODUCT_BYTES", 8 * 900 * 10)  # 10 rows at a time
    with Products() as blocked_mode:
        (blocked,) = accs[1].corrections([W])
    assert torch.equal(blocked, whole)
    assert (whole_mode.rows, blocked_mode.rows) == (64, 10)


def test_targets_written_in_place_have_the_bits_of_the_copies():
    x_fp, x_q = (x.float() for x in _pair(4, n=96, tokens=400))
    weights = [heavy_weight(40, 96, 4).float(), heavy_weight(24, 96, 5).float()]
    acc = AsymmetricAccumulator(96)
    acc.add(x_q, x_fp)
    corrections, H_q = acc.corrections(weights), acc.hessian
    copies = corrected_targets(weights, H_q, corrections)
    originals = [W.clone() for W in weights]
    written = corrected_targets(weights, H_q, corrections, in_place=True)
    assert all(w is W for w, W in zip(written, weights))
    assert all(torch.equal(W, c) and not torch.equal(W, o) for W, c, o in zip(weights, copies, originals))


def test_a_factor_made_ahead_gives_the_same_targets(monkeypatch):
    x_fp, x_q = (x.float() for x in _pair(4, n=96, tokens=400))
    weights = [heavy_weight(40, 96, 4).float()]
    acc = AsymmetricAccumulator(96)
    acc.add(x_q, x_fp)
    corrections, H_q = acc.corrections(weights), acc.hessian
    plain = corrected_targets(weights, H_q, corrections)
    U = target_factor(H_q)
    monkeypatch.setattr(asymmetric, "damped_inverse_cholesky", lambda *a, **k: pytest.fail("factorised again"))
    assert torch.equal(corrected_targets(weights, H_q, corrections, factor=U)[0], plain[0])
    with pytest.raises(ValueError, match=r"a factor of shape \(96, 96\) for H_q of shape \(48, 48\)"):
        corrected_targets([w[:, :48] for w in weights], H_q[:48, :48], [c[:, :48] for c in corrections], factor=U)


def test_aligned_rows_are_whole_blocks_covering_the_share():
    from bpdq.solvers.asymmetric import _row_ranges, aligned_rows

    rows, width = 5000, 20000
    starts = {r0 for r0, _ in _row_ranges(rows, width)} | {rows}
    for r0, r1 in ((0, 2500), (2500, 5000), (1, 2), (209, 418), (4999, 5000)):
        lo, hi = aligned_rows(r0, r1, rows, width)
        assert lo <= r0 and hi >= r1 and lo in starts and hi in starts, (r0, r1, lo, hi)
    assert aligned_rows(2500, 5000, rows, width) == (2299, 5000)  # blocks of 4194304 // 20000 = 209 rows


def test_targets_only_for_the_rows_a_rank_solves():
    from torch import nn

    from bpdq.engine.quality import asymmetric_targets_of
    from bpdq.solvers.asymmetric import AsymmetricAccumulator

    torch.manual_seed(0)
    x_q = torch.randn(256, 64)
    x_fp = x_q + 0.1 * torch.randn(256, 64)

    def run(rows):
        layer = nn.ModuleDict({"a": nn.Linear(64, 48, bias=False), "b": nn.Linear(64, 32, bias=False)})
        torch.manual_seed(1)
        for m in layer.values():
            nn.init.normal_(m.weight)
        before = {n: m.weight.detach().clone() for n, m in layer.items()}
        acc = AsymmetricAccumulator(64)
        acc.add(x_q, x_fp)
        hessians = asymmetric_targets_of(layer, ["a", "b"], {"a": acc}, {"b": "a"}, rows=rows)
        return hessians, {n: m.weight.detach() for n, m in layer.items()}, before

    h_all, w_all, before = run(None)
    h_part, w_part, _ = run({"a": (0, 48), "b": None})  # this rank solves a, another rank b
    assert h_part["b"] is None and torch.equal(h_part["a"], h_all["a"])
    assert torch.equal(w_part["a"], w_all["a"]) and not torch.equal(w_all["a"], before["a"])
    assert torch.equal(w_part["b"], before["b"])  # not this rank's: left as it was
    h_none, w_none, _ = run({"a": None, "b": None})
    assert h_none == {"a": None, "b": None} and torch.equal(w_none["a"], before["a"])
