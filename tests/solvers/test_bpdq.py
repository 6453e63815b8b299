"""bpdq/solvers/bpdq.py: BPDQ equals its literal oracle, beats GPTQ at 2 bits, keeps its bookkeeping."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bpdq
from bpdq.grids import BitPlaneGrid, UniformGrid
from bpdq.quantized import dequantize_packed
from bpdq.solvers import BPDQ, GPTQ, bpdq_sweep, prepare_layer
from bpdq.solvers.bpdq import _GroupSweeper
from tests.solvers.cases import correlated_hessian, correlated_inputs, heavy_weight
from tests.solvers.oracle import oracle_bpdq
from tests.strategies import seeds


def _case(out, inp, seed, dtype=torch.float64):
    return heavy_weight(out, inp, seed).to(dtype), correlated_hessian(inp, seed).to(dtype)


def _sweep_with_errors(W, U, grid, group_size, **kw):
    """:func:`bpdq_sweep` and its final errors ``E [out, in]`` (sweep order): each group's kept errors, as the
    sweep's group solver returns them, in the order the groups are solved."""
    kept = []
    solve = _GroupSweeper.solve

    def recording(self, *args, **kwargs):
        result = solve(self, *args, **kwargs)
        kept.append(result.errors)
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_GroupSweeper, "solve", recording)
        res = bpdq_sweep(W, U, grid, group_size, **kw)
    return res, torch.cat(kept, dim=1)


@pytest.mark.parametrize(
    "k, order, block, iters, seed",
    [(1, "gar", 64, 4, 0), (2, "gar", 64, 10, 1), (2, "none", 32, 4, 2), (3, "gar", 128, 4, 3), (4, "gar", 64, 3, 4)],
)
def test_product_equals_literal_oracle(k, order, block, iters, seed):
    W, H = _case(8, 128, seed)
    H[5, :] = H[:, 5] = 0  # one dead input
    grid = BitPlaneGrid(planes=k)
    ref = oracle_bpdq(W, H, grid, 32, iters=iters, order=order, block=block)
    # the solver's own path, run in float64 (Solver.__call__ would cast to float32)
    codes, coeffs, stats = BPDQ(iters=iters, order=order, block_size=block, refit="none")._solve(W.clone(), H, grid, 32)
    assert torch.equal(codes, ref.codes)
    torch.testing.assert_close(coeffs, ref.coeffs, rtol=1e-12, atol=1e-12)
    assert stats.best_iters == ref.best_iters
    assert stats.extra["dead_inputs"] == 1


def test_product_matches_oracle_in_float32_through_the_public_api():
    W, H = _case(16, 128, 11, torch.float32)
    grid = BitPlaneGrid(planes=2)
    qw = BPDQ(refit="none")(W, H, grid, 32)
    ref = oracle_bpdq(W, H, grid, 32)
    same = (qw.codes() == ref.codes).float().mean().item()
    assert same > 0.99  # rounding in another order may flip a rare near-tie, nothing more
    ref_q = dequantize_packed(qw.planes, ref.coeffs.permute(1, 2, 0).to(torch.float16), 32)
    assert abs(qw.stats.proxy_loss - bpdq.solvers.proxy_loss(W, ref_q, H)[0]) < 0.02 * qw.stats.proxy_loss


@pytest.mark.parametrize("out, inp, seed", [(16, 128, 0), (8, 256, 1), (24, 192, 2), (12, 128, 3)])
def test_bpdq_k2_beats_gptq_2bit_on_correlated_hessians(out, inp, seed):
    W, H = _case(out, inp, seed, torch.float32)
    b = BPDQ()(W, H, BitPlaneGrid(planes=2), 64)
    q = GPTQ()(W, H, UniformGrid(bits=2), 64)
    assert b.stats.proxy_loss < q.stats.proxy_loss


@pytest.mark.parametrize("seed", [0, 1])
def test_bpdq_k3_beats_gptq_3bit(seed):
    W, H = _case(16, 128, seed, torch.float32)
    assert BPDQ()(W, H, BitPlaneGrid(planes=3), 64).stats.proxy_loss < GPTQ()(W, H, UniformGrid(bits=3), 64).stats.proxy_loss


@settings(max_examples=10)
@given(seed=seeds, k=st.integers(1, 3))
def test_best_iterate_retention_single_group_is_exact(seed, k):
    """One group: the kept score (= the damped proxy loss) of 10 iterations is at most that of 1."""
    W, H = _case(8, 32, seed)
    layer = prepare_layer(W, H, 32, "gar", 0.01)
    grid = BitPlaneGrid(planes=k)
    one = bpdq_sweep(layer.W.clone(), layer.U, grid, 32, iters=1)
    ten = bpdq_sweep(layer.W.clone(), layer.U, grid, 32, iters=10)
    assert ten.scores[0] <= one.scores[0]
    assert 1 <= ten.best_iters[0] <= 10 and one.best_iters == [1]


@settings(max_examples=6, deadline=None)
@given(seed=seeds, k=st.integers(1, 3), block=st.sampled_from([32, 64, 96]))
def test_every_group_keeps_an_iterate_at_least_as_good_as_its_first(seed, k, block):
    """What best-iterate retention guarantees in a multi-group sweep: each group's kept score is at most the
    score its first iteration reaches from the same entry weights (earlier groups' errors propagated)."""
    W, H = _case(6, 96, seed)
    layer = prepare_layer(W, H, 32, "gar", 0.01)
    grid = BitPlaneGrid(planes=k)
    res, errors = _sweep_with_errors(layer.W.clone(), layer.U, grid, 32, iters=6, block=block)
    sweeper = _GroupSweeper(6, 32, W.dtype, W.device)
    for j, s in enumerate(range(0, 96, 32)):
        # W - Q = E U (U upper): a group's entry weights are the originals minus the earlier errors propagated
        entry = layer.W[:, s : s + 32] - errors[:, :s] @ layer.U[:s, s : s + 32]
        first = sweeper.solve(entry, layer.U[s : s + 32, s : s + 32], grid, iters=1, alpha=1e-4, tol=None)
        assert res.scores[j] <= first.score * (1 + 1e-9)


def test_delta_correction_keeps_the_oracle_bookkeeping_consistent():
    """After each group the block's weights equal the entry weights with the final errors propagated."""
    W, H = _case(6, 128, 5)
    ref = oracle_bpdq(W, H, BitPlaneGrid(planes=2), 32, iters=5, block=128)
    for tr in ref.traces:
        i1, i2 = tr.block
        s, e = tr.start, tr.start + 32
        U1 = ref.U[i1:i2, i1:i2]
        expected_tail = tr.entry[:, e:] - tr.errors @ U1[s:e, e:]
        torch.testing.assert_close(tr.after[:, e:], expected_tail, rtol=1e-10, atol=1e-10)
        # the group holds the final values, and E U_loc = entry - values
        torch.testing.assert_close(tr.errors @ U1[s:e, s:e], tr.entry[:, s:e] - tr.after[:, s:e], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(tr.after[:, :s], tr.entry[:, :s], rtol=0, atol=0)


@pytest.mark.parametrize("block", [32, 64, 128])
def test_product_errors_reproduce_the_stored_model(block):
    """W - Q = E U over the whole layer, with Q the stored (fp16-coefficient) model in sweep order."""
    W, H = _case(8, 128, 6)
    layer = prepare_layer(W, H, 32, "gar", 0.01)
    res, errors = _sweep_with_errors(layer.W.clone(), layer.U, BitPlaneGrid(planes=2), 32, iters=4, block=block)
    planes = bpdq.bits.pack_bits(bpdq.bits.codes_to_bits(res.codes, 2))
    Q = dequantize_packed(planes, res.coeffs.permute(1, 2, 0).to(torch.float16), 32).double()
    torch.testing.assert_close(layer.W - Q, errors @ layer.U, rtol=1e-9, atol=1e-9)
    assert sum(res.scores) == pytest.approx(float(errors.pow(2).sum()), rel=1e-9)


def test_gar_result_in_original_order_is_what_the_sweep_produced():
    W, H = _case(8, 128, 7, torch.float32)
    grid = BitPlaneGrid(planes=2)
    qw = BPDQ(iters=3, refit="none")(W, H, grid, 32)
    layer = prepare_layer(W, H, 32, "gar", 0.01)
    assert not torch.equal(layer.perm, torch.arange(128))
    res = bpdq_sweep(layer.W.clone(), layer.U, grid, 32, iters=3)
    planes = bpdq.bits.pack_bits(bpdq.bits.codes_to_bits(res.codes, 2))
    internal = dequantize_packed(planes, res.coeffs.permute(1, 2, 0).to(torch.float16), 32)
    assert torch.equal(qw.dequantize()[:, layer.perm], internal)
    # group membership: each sweep group is one original group
    blocks = layer.perm.view(4, 32)
    assert torch.all(blocks // 32 == blocks[:, :1] // 32)
    assert torch.equal(qw.coeffs[blocks[:, 0] // 32], res.coeffs.permute(1, 2, 0).to(torch.float16))


def test_degenerate_inputs_give_finite_results():
    W = heavy_weight(8, 128, 8)
    W[:, 32:64] = 0  # an all-zero group (it still receives the errors propagated from earlier groups)
    x = correlated_inputs(128, 8, samples=40)  # rank-deficient Hessian
    x[:, 100:110] = 0  # dead inputs
    H = 2 / 40 * x.T @ x
    for k in (1, 2, 4):
        qw = BPDQ(iters=3)(W, H, BitPlaneGrid(planes=k), 32)
        Q = qw.dequantize()
        assert torch.isfinite(Q).all() and torch.isfinite(torch.tensor(qw.stats.proxy_loss))
        assert qw.stats.extra["dead_inputs"] == 10
    zero = BPDQ(iters=2)(torch.zeros(4, 64), correlated_hessian(64, 8), BitPlaneGrid(planes=2), 32)
    assert torch.all(zero.dequantize() == 0)


def test_bpdq_rejects_other_grids_and_bad_options():
    W, H = _case(4, 64, 9, torch.float32)
    with pytest.raises(ValueError, match="use solver 'gptq'"):
        BPDQ()(W, H, UniformGrid(bits=2), 32)
    with pytest.raises(ValueError, match="init_bits"):
        BPDQ(init_bits=2)(W, H, BitPlaneGrid(planes=3), 32)
    with pytest.raises(ValueError, match="iters"):
        BPDQ(iters=0)
    with pytest.raises(ValueError, match="needs a Hessian"):
        BPDQ()(W, None, BitPlaneGrid(planes=2), 32)
    assert bpdq.SOLVERS.get("bpdq") is BPDQ and BPDQ.requires_hessian


def test_stats_best_iters_and_optional_early_stop():
    W, H = _case(8, 128, 10, torch.float32)
    grid = BitPlaneGrid(planes=2)
    full = BPDQ()(W, H, grid, 32)
    assert len(full.stats.best_iters) == 4 and all(1 <= i <= 10 for i in full.stats.best_iters)
    assert full.stats.extra["iters_run"] == [10] * 4
    assert 0 < full.stats.relative_loss < 1 and full.stats.time_s > 0
    early = BPDQ(tol=0.5)(W, H, grid, 32)
    assert all(1 <= n < 10 for n in early.stats.extra["iters_run"])
    assert all(b <= n for b, n in zip(early.stats.best_iters, early.stats.extra["iters_run"]))
    # init_bits=k starts from the k-bit uniform codes instead of the top planes of 8-bit ones
    coarse = BPDQ(init_bits=2, iters=1)(W, H, grid, 32)
    assert coarse.solver["init_bits"] == 2 and torch.isfinite(coarse.dequantize()).all()


def test_sweeps_need_blocks_of_whole_groups():
    W, H = _case(4, 64, 12)
    layer = prepare_layer(W, H, 32, "none", 0.01)
    with pytest.raises(ValueError, match="multiple of group_size"):
        bpdq_sweep(layer.W.clone(), layer.U, BitPlaneGrid(planes=2), 32, block=48)
    with pytest.raises(ValueError, match="multiple of group_size"):
        bpdq.solvers.gptq_sweep(layer.W.clone(), layer.U, UniformGrid(bits=2), 32, 48)


@pytest.mark.parametrize("solver", ["bpdq", {"type": "gptq", "refit": "full"}])
def test_an_indefinite_hessian_with_a_positive_diagonal_gives_sane_weights(solver):
    """The sweep needs more damping to factorise such a Hessian; the refit must fit against that damped,
    positive definite Hessian too, not the indefinite one (whose 'loss' has no minimum)."""
    torch.manual_seed(0)
    d = 128
    X = torch.randn(512, d)
    H = X.T @ X / 512
    v = torch.nn.functional.normalize(torch.randn(d), dim=0)
    H -= 3.0 * float(torch.linalg.eigvalsh(H).max()) * torch.outer(v, v)
    assert float(H.diagonal().min()) > 0 and float(torch.linalg.eigvalsh(H).min()) < 0
    W = torch.randn(64, d)
    gptq = bpdq.quantize_weight(W, H, grid={"type": "uniform", "bits": 2}, solver="gptq", group_size=32)
    qw = bpdq.quantize_weight(W, H, grid={"type": "bitplane", "planes": 2}, solver=solver, group_size=32)
    assert qw.stats.extra["cholesky_retries"] > 0
    error = float((W - qw.dequantize()).norm() / W.norm())
    reference = float((W - gptq.dequantize()).norm() / W.norm())
    assert reference < 0.6 and error < 1.5 * reference, (error, reference)
    assert qw.stats.extra["refit"]["loss_after"] >= 0
