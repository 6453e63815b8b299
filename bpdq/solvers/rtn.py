"""Round-to-nearest: every group of every row independently, no Hessian.

Uniform grid: min-max init then nearest level. Bit-plane grid: the initial planes (top k of an 8-bit
quantization) with least-squares coefficients, then ``refits`` rounds of nearest-level / refit (Lloyd
steps in the plain metric), never keeping a round that increases the squared error.
"""

from __future__ import annotations

import torch
from pydantic import Field

from bpdq.grids.base import Grid, round_coeffs
from bpdq.grids.uniform import UniformGrid
from bpdq.options import Options
from bpdq.quantized import SolveStats
from bpdq.registry import SOLVERS
from bpdq.solvers.base import Solver, group_rows


#: Weights per chunk of groups solved at once (temporaries scale with it, not with the layer).
_CHUNK_WEIGHTS = 1 << 20


class RTNOptions(Options):
    refits: int = Field(default=2, ge=0, le=100, description="bit-plane grid only: nearest-level/refit rounds")


@SOLVERS.register("rtn")
class RTN(Solver):
    Options = RTNOptions

    def _solve(self, W: torch.Tensor, H: torch.Tensor | None, grid: Grid, group_size: int) -> tuple[torch.Tensor, torch.Tensor, SolveStats]:
        out, inp = W.shape
        rows = group_rows(W, group_size)
        # Groups are independent: solving them in chunks gives the same result and bounds the temporaries
        # (the bit-plane fit's float64 design matrices are ~24 bytes per weight: 0.7 GB for a 5632x2048 layer).
        chunk = max(1, _CHUNK_WEIGHTS // group_size)
        parts = [self._solve_rows(rows[i : i + chunk], grid) for i in range(0, rows.shape[0], chunk)]
        parts = [(codes.to(torch.uint8), coeffs) for codes, coeffs in parts]  # codes < 2^k <= 256
        codes = torch.cat([c for c, _ in parts]) if len(parts) > 1 else parts[0][0]
        coeffs = torch.cat([c for _, c in parts]) if len(parts) > 1 else parts[0][1]
        return codes.view(out, inp), coeffs.view(out, inp // group_size, -1), SolveStats()

    def _solve_rows(self, rows: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        coeffs = round_coeffs(grid.init(rows))
        codes = grid.snap(rows, coeffs)
        if not isinstance(grid, UniformGrid):
            err = _sq_err(grid, rows, codes, coeffs)
            for _ in range(self.options.refits):
                new_coeffs = round_coeffs(grid.fit(rows, codes))
                new_codes = grid.snap(rows, new_coeffs)
                new_err = _sq_err(grid, rows, new_codes, new_coeffs)
                better = new_err < err
                coeffs = torch.where(better.unsqueeze(1), new_coeffs, coeffs)
                codes = torch.where(better.unsqueeze(1), new_codes, codes)
                err = torch.minimum(err, new_err)
        return codes, coeffs


def _sq_err(grid: Grid, rows: torch.Tensor, codes: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    return (grid.dequant(codes, coeffs) - rows).pow(2).sum(1)
