"""Add a solver: round-to-nearest whose coefficient refits weight each input by its activation energy.

``diag_rtn`` sits between RTN (no calibration) and GPTQ (full Hessian, error propagation): it uses only the
diagonal of the Hessian, ``H_jj`` (how large input ``j`` is on the calibration data), as a per-column
weight in the least-squares refit of every group's coefficients. Importing this file registers it (so
``bpdq quantize --plugin docs/examples/add_solver.py`` can use it from a config); running it compares it
with ``rtn`` on one layer and quantizes a tiny random Llama from a config
(``bpdq.QuantizeConfig.from_dict``). See docs/guides/add-a-solver.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from pydantic import Field

import bpdq
from bpdq.grids import round_coeffs
from bpdq.options import Options
from bpdq.quantized import SolveStats
from bpdq.solvers import HessianAccumulator, Solver


class DiagRTNOptions(Options):
    refits: int = Field(default=3, ge=0, le=100, description="nearest-level / weighted-refit rounds, 0..100")


@bpdq.SOLVERS.register("diag_rtn")
class DiagRTN(Solver):
    """Nearest level, then ``refits`` rounds of (H_jj-weighted least squares, nearest level) per group."""

    Options = DiagRTNOptions
    requires_hessian = True  # Solver.__call__ then refuses hessian=None with a clear message

    def _solve(self, W, H, grid, group_size):
        # W: float32 copy [out, in]; H: float32 [in, in]; both already validated by Solver.__call__.
        out, inp = W.shape
        weight = H.diagonal().clamp_min(1e-8 * H.diagonal().mean().clamp_min(1e-30)).sqrt()
        codes = torch.empty(out, inp, dtype=torch.int64)
        coeffs = torch.empty(out, inp // group_size, grid.planes + 1)
        for j in range(inp // group_size):
            cols = slice(j * group_size, (j + 1) * group_size)
            w = W[:, cols]  # [out, g]: every output row of group j is one grid row
            whiten = torch.diag(weight[cols])  # the metric sum_j H_jj (w_j - q_j)^2
            c = round_coeffs(grid.init(w))
            q = grid.snap(w, c)
            best = _weighted_error(grid, w, q, c, weight[cols])
            for _ in range(self.options.refits):
                new_c = round_coeffs(grid.fit(w, q, whiten=whiten))
                new_q = grid.snap(w, new_c)
                err = _weighted_error(grid, w, new_q, new_c, weight[cols])
                keep = (err < best).unsqueeze(1)  # never accept a round that is worse for a row
                c, q, best = torch.where(keep, new_c, c), torch.where(keep, new_q, q), torch.minimum(err, best)
            codes[:, cols], coeffs[:, j] = q, c
        return codes, coeffs, SolveStats(extra={"refits": self.options.refits})


def _weighted_error(grid, w, codes, coeffs, weight):
    return ((grid.dequant(codes, coeffs) - w) * weight).pow(2).sum(dim=1)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _example_utils import ByteTokenizer, tiny_llama  # the tiny random Llama and tokenizer of every example

    # 1. From Python: one layer whose inputs have very different scales (a few "outlier" features).
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    x = torch.randn(2048, 128) * torch.where(torch.rand(128) < 0.1, 10.0, 1.0)
    acc = HessianAccumulator(128)
    acc.add(x)
    grid = {"type": "bitplane", "planes": 2}
    losses = {}
    for solver in ("rtn", "diag_rtn"):
        qw = bpdq.quantize_weight(weight, acc.hessian, grid=grid, solver=solver, group_size=32)
        losses[solver] = qw.stats.relative_loss  # tr((W-Q) H (W-Q)^T) / tr(W H W^T)
        print(f"{solver:>8}: relative proxy loss {qw.stats.relative_loss:.4f}")
    if not losses["diag_rtn"] < losses["rtn"]:
        raise SystemExit(f"expected the H-weighted refit to lower the proxy loss, got {losses}")
    try:
        bpdq.quantize_weight(weight, None, grid=grid, solver="diag_rtn", group_size=32)
    except ValueError as err:
        print("without a Hessian:", err)

    # 2. From a config: diag_rtn everywhere, but plain rtn for the MLP down projections.
    config = bpdq.QuantizeConfig.from_dict({
        "quantize": {"group_size": 32, "grid": {"type": "bitplane", "planes": 2},
                     "solver": {"type": "diag_rtn", "refits": 2}},
        "rules": [{"match": r".*\.mlp\.down_proj", "solver": "rtn"}],
        "calibration": {"samples": 4, "seq_len": 32}, "device": "cpu", "progress": False,
    })
    report = bpdq.quantize(tiny_llama(), config, tokenizer=ByteTokenizer())
    solvers = {m.name: m.recipe["solver"]["type"] for m in report.quantized}
    layer1 = {k.removeprefix("model.layers.1."): v for k, v in solvers.items() if k.startswith("model.layers.1.")}
    print("solver per module of layer 1:", layer1)
    if sorted(set(solvers.values())) != ["diag_rtn", "rtn"]:
        raise SystemExit(f"expected diag_rtn and rtn (down_proj) in the report, got {solvers}")


if __name__ == "__main__":
    main()
