"""bpdq/solvers/base.py: the Solver template (validation, float32 copy, timing, proxy loss) and helpers."""

from __future__ import annotations

import pytest
import torch

from bpdq.grids import BitPlaneGrid, UniformGrid
from bpdq.quantized import SolveStats
from bpdq.solvers import RTN, Solver, check_weight, group_rows, proxy_loss


class Recorder(Solver):
    """An unregistered solver that records what ``_solve`` receives and returns all-zero codes."""

    requires_hessian = False

    def _solve(self, W, H, grid, group_size):
        self.seen = (W, H)
        W.mul_(0)  # must not touch the caller's tensor
        out, inp = W.shape
        coeffs = torch.zeros(out, inp // group_size, grid.planes + 1)
        coeffs[..., -1] = 1.0
        return torch.zeros(out, inp, dtype=torch.int64), coeffs, SolveStats(extra={"called": True})


def test_solve_gets_a_float32_copy_and_the_result_keeps_the_input_dtype():
    weight = torch.randn(4, 64, dtype=torch.float16)
    original = weight.clone()
    solver = Recorder()
    qw = solver(weight, None, UniformGrid(bits=2), 32)
    W, H = solver.seen
    assert W.dtype == torch.float32 and H is None
    assert torch.equal(weight, original)
    assert qw.dtype == torch.float16 and qw.shape == (4, 64) and qw.group_size == 32
    assert torch.equal(qw.dequantize(torch.float32), torch.ones(4, 64))
    assert qw.grid == {"type": "uniform", "bits": 2, "symmetric": False}
    assert qw.solver == {"type": "<unregistered>"}
    assert qw.stats.extra == {"called": True} and qw.stats.time_s >= 0
    assert qw.stats.proxy_loss is None


def test_proxy_loss_is_filled_in_when_a_hessian_is_given():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 32, generator=gen)
    x = torch.randn(100, 32, generator=gen)
    H = 2 / 100 * x.T @ x
    qw = Recorder()(weight, H, UniformGrid(bits=2), 32)
    loss, rel = proxy_loss(weight, torch.ones(3, 32), H)
    assert qw.stats.proxy_loss == pytest.approx(loss) and qw.stats.relative_loss == pytest.approx(rel)


def test_proxy_loss_values():
    W = torch.tensor([[1.0, 2.0]])
    Q = torch.tensor([[0.0, 2.0]])
    assert proxy_loss(W, Q, torch.eye(2)) == (1.0, 0.2)
    H = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    # D = [1, 0]: D H D^T = 2; W H W^T = 2 + 4 + 12 = 18
    assert proxy_loss(W, Q, H) == pytest.approx((2.0, 2.0 / 18.0))
    assert proxy_loss(torch.zeros(1, 2), torch.zeros(1, 2), H) == (0.0, 0.0)
    assert proxy_loss(torch.zeros(1, 2), Q, H)[1] == float("inf")


def test_group_rows_layout():
    W = torch.arange(2 * 16.0).view(2, 16)
    rows = group_rows(W, 8)
    assert rows.shape == (4, 8)
    assert torch.equal(rows[1], W[0, 8:]) and torch.equal(rows[2], W[1, :8])


def test_hessian_required_solver_raises_without_one():
    class NeedsH(Recorder):
        requires_hessian = True
        name = "needs-h"

    with pytest.raises(ValueError, match="solver 'needs-h' needs a Hessian"):
        NeedsH()(torch.randn(2, 32), None, UniformGrid(bits=2), 32)


def test_grid_must_be_a_grid_instance():
    with pytest.raises(TypeError, match="grid must be a Grid instance, got str"):
        RTN()(torch.randn(2, 32), None, "uniform", 32)


@pytest.mark.parametrize(
    ("weight", "group_size", "error", "pattern"),
    [
        ([[1.0]], 32, TypeError, "weight must be a torch.Tensor, got list"),
        (torch.randn(64), 32, ValueError, r"weight must be 2-D \[out_features, in_features\], got shape \(64,\)"),
        (torch.randn(2, 2, 64), 32, ValueError, r"weight must be 2-D .*got shape \(2, 2, 64\)"),
        (torch.ones(2, 64, dtype=torch.int32), 32, TypeError, "weight must be floating point, got torch.int32"),
        (torch.randn(0, 64), 32, ValueError, r"weight is empty: shape \(0, 64\)"),
        (torch.randn(2, 64), 32.0, TypeError, "group_size must be an int, got float"),
        (torch.randn(2, 64), True, TypeError, "group_size must be an int, got bool"),
        (torch.randn(2, 64), 12, ValueError, "group_size must be a positive multiple of 8 .*got 12"),
        (torch.randn(2, 64), -8, ValueError, "group_size must be a positive multiple of 8 .*got -8"),
        (torch.randn(2, 96), 64, ValueError,
         r"in_features 96 is not divisible by group_size 64; allowed group sizes for this layer: "
         r"\[8, 16, 24, 32, 48, 96\]"),
    ],
)
def test_check_weight_errors_name_the_argument_and_allowed_values(weight, group_size, error, pattern):
    with pytest.raises(error, match=pattern):
        check_weight(weight, group_size)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_rejected(bad):
    weight = torch.randn(2, 32)
    weight[1, 3] = bad
    with pytest.raises(ValueError, match="weight contains NaN or Inf values; all entries must be finite"):
        RTN()(weight, None, BitPlaneGrid(planes=2), 32)


def test_a_solver_call_rejects_a_hessian_that_is_not_a_tensor():
    with pytest.raises(TypeError, match="hessian must be a torch.Tensor or None, got ndarray"):
        RTN()(torch.randn(2, 32), torch.eye(32).numpy(), UniformGrid(bits=2), 32)


def test_wrong_hessian_shape_through_a_solver_call():
    with pytest.raises(ValueError, match=r"hessian must be \[in_features, in_features\] = \[32, 32\], got \(16, 16\)"):
        RTN()(torch.randn(2, 32), torch.eye(16), UniformGrid(bits=2), 32)


def _explicit_losses(W: torch.Tensor, qw, H: torch.Tensor) -> tuple[float, float]:
    """``tr((W-Q) H (W-Q)^T)`` and ``tr(W H W^T)`` in float64, straight from the definition."""
    W64, H64 = W.to(torch.float64), H.to(torch.float64)
    D = W64 - qw.dequantize(torch.float64)
    return float(((D @ H64) * D).sum()), float(((W64 @ H64) * W64).sum())


def _dead(H: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    idx = torch.randperm(H.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    H = H.clone()
    H[idx, :] = 0.0
    H[:, idx] = 0.0
    return H


def _indefinite(H: torch.Tensor) -> torch.Tensor:
    """A symmetric ``H`` with a non-negative diagonal but a negative eigenvalue: ``damp=0.001`` fails to
    factorise, the first retry (``0.01``) succeeds."""
    shift = 3e-3 * float(torch.diagonal(H).mean()) - float(torch.linalg.eigvalsh(H.double()).min())
    return H - shift * torch.eye(H.shape[0])


# (solver, grid, Hessian variant): dead inputs, act-order/gar and none, damping retries, refit on/off, k=2/3,
# uniform and bitplane grids; each case goes through the solver's own statistics path
STATS_CASES = [
    ("gptq", {}, UniformGrid(bits=2), "plain"),
    ("gptq", {"order": "none"}, UniformGrid(bits=3), "dead"),
    ("gptq", {"block_size": 64}, UniformGrid(bits=4, symmetric=True), "rank_deficient"),
    ("gptq", {"damp": 0.001}, UniformGrid(bits=2), "indefinite"),
    ("gptq", {"damp": 0.0}, UniformGrid(bits=3), "plain"),
    ("gptq", {}, BitPlaneGrid(planes=2), "dead"),
    ("gptq", {"refit": "full"}, BitPlaneGrid(planes=3), "dead"),
    ("bpdq", {"iters": 2}, BitPlaneGrid(planes=2), "dead"),
    ("bpdq", {"iters": 2, "order": "none"}, BitPlaneGrid(planes=3), "rank_deficient"),
    ("bpdq", {"iters": 2, "refit": "none"}, BitPlaneGrid(planes=2), "plain"),
    ("bpdq", {"iters": 2, "damp": 0.001}, BitPlaneGrid(planes=2), "indefinite"),
    ("rtn", {}, UniformGrid(bits=2), "dead"),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name, options, grid, variant", STATS_CASES)
def test_reported_losses_equal_the_float64_definition(name, options, grid, variant, seed):
    from bpdq.registry import SOLVERS
    from tests.solvers.cases import correlated_hessian, heavy_weight

    W = heavy_weight(24, 256, seed)
    H = correlated_hessian(256, seed, samples=128 if variant == "rank_deficient" else None)
    H = {"dead": lambda: _dead(H, 5, seed), "indefinite": lambda: _indefinite(H)}.get(variant, lambda: H)()
    qw = SOLVERS.get(name)(**options)(W, H, grid, 64)
    if variant == "indefinite":
        assert qw.stats.extra["cholesky_retries"] == 1 and qw.stats.extra["damp"] == pytest.approx(0.01)
    if variant == "dead" and name != "rtn":
        assert qw.stats.extra["dead_inputs"] == 5
    loss, reference = _explicit_losses(W, qw, H)
    assert loss > 0 and reference > 0
    assert qw.stats.proxy_loss == pytest.approx(loss, rel=1e-5)
    assert qw.stats.relative_loss == pytest.approx(loss / reference, rel=1e-5)


def test_quadratic_forms_use_the_symmetry_of_h():
    from bpdq.solvers.base import quadratic_forms
    from tests.solvers.cases import correlated_hessian, heavy_weight

    X, H = heavy_weight(7, 200, 3), correlated_hessian(200, 3)
    expected = ((X.double() @ H.double()) * X.double()).sum(1)
    for blocks in (1, 3, 8, 200, 500):  # 200 columns: uneven last block, one column per block, more blocks than columns
        terms = quadratic_forms(X, H, blocks=blocks)
        assert terms.dtype == torch.float64 and terms.shape == (7,)
        torch.testing.assert_close(terms, expected, rtol=1e-5, atol=0)
        exact = quadratic_forms(X.double(), H.double(), dtype=torch.float64, blocks=blocks)  # the refit's losses
        torch.testing.assert_close(exact, expected, rtol=1e-12, atol=0)
        # H converted block by block (the refit passes its float32 H): the same bits as a float64 copy
        assert torch.equal(quadratic_forms(X.double(), H, dtype=torch.float64, blocks=blocks), exact)
