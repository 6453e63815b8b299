"""bpdq/api.py: building grids and solvers from specs, and quantize_weight with user-registered plug-ins."""

from __future__ import annotations

import doctest

import pytest
import torch
from pydantic import Field

import bpdq
from bpdq import GRIDS, SOLVERS, BitPlaneGrid, Grid, Solver, UniformGrid, build_grid, build_solver, quantize_weight
from bpdq.options import Options
from bpdq.quantized import SolveStats
from bpdq.solvers import RTN, group_rows


class SignOptions(Options):
    spread: float = Field(default=1.0, gt=0, description="levels at mean -/+ spread * std, > 0")


class SignGrid(Grid):
    """User grid: one plane, two levels at mean -/+ spread * std of each row."""

    Options = SignOptions

    @property
    def planes(self) -> int:
        return 1

    def _init(self, w):
        mean, std = w.mean(1), w.std(1, unbiased=False) * self.options.spread
        return torch.stack([2 * std, mean - std], dim=1)


class SnapOnce(Solver):
    """User solver: init + nearest level per row of each group, with an option that shows up in stats."""

    class Options(Options):
        tag: str = "x"

    def _solve(self, W, H, grid, group_size):
        rows = group_rows(W, group_size)
        coeffs = grid.init(rows)
        codes = grid.snap(rows, coeffs)
        out, inp = W.shape
        stats = SolveStats(extra={"tag": self.options.tag})
        return codes.view(out, inp), coeffs.view(out, inp // group_size, -1), stats


def test_user_grid_and_solver_work_by_name_and_by_dict_spec(register):
    register(GRIDS, "test-sign", SignGrid)
    register(SOLVERS, "test-snap-once", SnapOnce)
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    by_name = quantize_weight(w, grid="test-sign", solver="test-snap-once", group_size=32)
    by_dict = quantize_weight(
        w, grid={"type": "test-sign", "spread": 1.0}, solver={"type": "test-snap-once", "tag": "y"}, group_size=32
    )
    assert torch.equal(by_name.planes, by_dict.planes) and torch.equal(by_name.coeffs, by_dict.coeffs)
    assert by_name.k == 1 and by_name.grid == {"type": "test-sign", "spread": 1.0}
    assert by_dict.solver == {"type": "test-snap-once", "tag": "y"} and by_dict.stats.extra == {"tag": "y"}
    # the result really is the user grid: each row of each group holds (at most) two levels, mean -/+ std
    rows = group_rows(w, 32)
    q = group_rows(by_name.dequantize(), 32)
    expected_hi = rows.mean(1) + rows.std(1, unbiased=False)
    torch.testing.assert_close(q.amax(1), expected_hi, rtol=2e-3, atol=2e-3)  # fp16 coefficients
    assert all(len(r.unique()) <= 2 for r in q)
    # and a built-in solver composes with the user grid too
    assert quantize_weight(w, grid="test-sign", solver="rtn", group_size=32).k == 1


def test_user_plugins_are_gone_after_unregistering(register):
    register(GRIDS, "test-sign", SignGrid)
    GRIDS.unregister("test-sign")
    with pytest.raises(ValueError, match="unknown grid 'test-sign'"):
        build_grid("test-sign")


def test_build_grid_and_solver_specs():
    assert build_grid("bitplane") == BitPlaneGrid()
    assert build_grid({"type": "uniform", "bits": 3}) == UniformGrid(bits=3)
    grid = UniformGrid(bits=2)
    assert build_grid(grid) is grid
    assert build_solver("rtn") == RTN()
    assert build_solver({"type": "rtn", "refits": 0}) == RTN(refits=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"grid": "nf4"}, ValueError, "unknown grid 'nf4'; known grids: .*'bitplane'.*'uniform'"),
        ({"solver": "awq"}, ValueError, "unknown solver 'awq'; known solvers: .*'rtn'"),
        ({"grid": {"type": "bitplane", "planes": 9}}, ValueError, r"planes: 9 is not in 1\.\.8"),
        ({"grid": {"type": "uniform", "bits": 0}}, ValueError, r"bits: 0 is not in 1\.\.8"),
        ({"grid": {"planes": 2}}, ValueError, "grid: a dict spec needs a 'type' key"),
        ({"grid": 2}, TypeError, "grid must be a registered grid name"),
        ({"solver": 2}, TypeError, "solver must be a registered solver name"),
        ({"group_size": 48}, ValueError, r"in_features 64 is not divisible by group_size 48; allowed group sizes"),
        ({"group_size": 0}, ValueError, "group_size must be a positive multiple of 8"),
        ({"weight": torch.randn(4, 2, 64)}, ValueError, r"weight must be 2-D \[out_features, in_features\]"),
        ({"weight": torch.randn(64)}, ValueError, r"weight must be 2-D \[out_features, in_features\]"),
        ({"weight": torch.tensor([[float("nan")] * 64])}, ValueError, "weight contains NaN or Inf.*must be finite"),
        ({"weight": torch.full((1, 64), float("inf"))}, ValueError, "weight contains NaN or Inf.*must be finite"),
        ({"hessian": torch.eye(32)}, ValueError,
         r"hessian must be \[in_features, in_features\] = \[64, 64\], got \(32, 32\)"),
    ],
)
def test_bad_input_raises_naming_the_argument_and_allowed_values(kwargs, error, pattern):
    args = {"weight": torch.randn(4, 64), "hessian": None, "grid": "bitplane", "solver": "rtn", "group_size": 32}
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        quantize_weight(args.pop("weight"), args.pop("hessian"), **args)


def test_docstring_example_runs():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(bpdq.api.quantize_weight, globs={"torch": torch, "quantize_weight": quantize_weight}):
        runner.run(test)
    assert runner.summarize(verbose=False).attempted >= 2
    assert runner.summarize(verbose=False).failed == 0


def test_public_names_are_exported():
    for name in bpdq.__all__:
        assert hasattr(bpdq, name), name
