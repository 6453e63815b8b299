"""Cost of the solvers' proxy-loss statistics relative to the solve (issue 10, "Statistics cost").

Per layer (weight ``[out, in]``: 2048x5632 and 1536x576, heavy-tailed weights and a correlated Hessian from
``tests/solvers/cases.py``, g = 64) and solver (GPTQ over the 2-bit uniform grid; BPDQ k = 2 with its
defaults, refit ``full``), in one process and single-threaded (``--threads``):

- ``solve``: process CPU time of ``solver(W, H, grid, 64)``, statistics included;
- ``before``: the statistics as every solve computed them before: ``Q = qw.dequantize()`` and one float32
  ``[2*out, in] x [in, in]`` matmul of ``[W - Q; W]`` (loss and reference), row sums in float64;
- ``after``: the statistics work the solve does now, repeated on its own: for GPTQ the reference
  ``tr(W H W^T)`` (``quadratic_forms``, symmetric blocks) plus the sweep's bookkeeping (a copy of ``W`` and
  two column sums of squares over ``[out, in]``, the loss then being ``||E||^2`` minus the damping
  and dead-input terms); for BPDQ with refit the reference from the refit's ``H W`` (one float64 sum of
  ``HW * W``), the loss being the refit's own;
- the ratios ``before / core`` and ``after / core`` with ``core = solve - after`` (the solve without
  statistics). Target: ``after / core <= 0.10``.

``before`` and ``after`` are medians of 3 repetitions. Timings on a shared machine are noisy: compare the
ratios of one run.

    python benchmarks/bench_stats.py            # the real run (a few minutes, single thread)
    python benchmarks/bench_stats.py --smoke    # tiny layers: checks it runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bpdq.grids import BitPlaneGrid, UniformGrid  # noqa: E402
from bpdq.solvers import BPDQ, GPTQ, Solver  # noqa: E402
from bpdq.solvers.base import quadratic_forms  # noqa: E402
from tests.solvers.cases import correlated_hessian, heavy_weight  # noqa: E402

LAYERS = [(2048, 5632), (1536, 576)]
SMOKE_LAYERS = [(64, 256), (96, 128)]
GROUP = 64
TARGET = 0.10


def cpu_time(fn: Callable[[], object], reps: int = 1) -> float:
    """Median process CPU seconds of ``fn()`` over ``reps`` calls."""
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def stats_before(W: torch.Tensor, qw, H: torch.Tensor) -> float:
    """The statistics as ``Solver.__call__`` computed them for every solver before (one stacked matmul)."""
    Q = qw.dequantize(torch.float32)
    X = torch.cat([W - Q, W])
    terms = ((X @ H) * X).sum(1, dtype=torch.float64)
    return float(terms[: W.shape[0]].sum()) / float(terms[W.shape[0] :].sum())


def stats_after_gptq(W: torch.Tensor, H: torch.Tensor, E: torch.Tensor, d: torch.Tensor) -> float:
    """GPTQ's statistics work now: the reference, the sweep's copy of ``W`` and its two column sums."""
    reference = float(quadratic_forms(W, H).sum())
    original = W.clone()
    R = original - W + E * d
    scaled = torch.linalg.vecdot(E, E, dim=0).to(torch.float64)
    residual = torch.linalg.vecdot(R, R, dim=0).to(torch.float64)
    return float(scaled.sum() - 0.01 * residual.sum()) / reference


def stats_after_refit(W: torch.Tensor, HW: torch.Tensor) -> float:
    """A refitting solver's statistics work now: the reference from the refit's ``H W``."""
    return float((HW * W).sum(dtype=torch.float64))


def measure(out: int, inp: int, name: str, solver: Solver, grid) -> dict[str, object]:
    W, H = heavy_weight(out, inp, seed=out + inp), correlated_hessian(inp, seed=inp)
    qw = None

    def solve() -> None:
        nonlocal qw
        qw = solver(W, H, grid, GROUP)

    solve_s = cpu_time(solve)
    before_s = cpu_time(lambda: stats_before(W, qw, H), reps=3)
    if isinstance(solver, GPTQ):
        E, d = torch.randn_like(W), torch.rand(inp) + 0.5  # stand-ins of the sweep's errors and diag(U)
        after_s = cpu_time(lambda: stats_after_gptq(W, H, E, d), reps=3)
    else:
        HW = W @ H
        after_s = cpu_time(lambda: stats_after_refit(W, HW), reps=3)
    core = max(solve_s - after_s, 1e-9)
    return {
        "layer": f"{out}x{inp}",
        "solver": name,
        "solve_s": solve_s,
        "before_s": before_s,
        "after_s": after_s,
        "before_ratio": before_s / core,
        "after_ratio": after_s / core,
        "relative_loss": qw.stats.relative_loss,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny layers: check that the benchmark runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    solvers = [("gptq-2bit", GPTQ(), UniformGrid(bits=2)), ("bpdq-k2", BPDQ(), BitPlaneGrid(planes=2))]
    rows = [measure(o, i, *s) for o, i in (SMOKE_LAYERS if args.smoke else LAYERS) for s in solvers]
    print(f"threads {args.threads}; process CPU seconds; ratios over the solve without statistics (target <= {TARGET})")
    print("| layer | solver | solve s | stats before s | stats after s | before / solve | after / solve | rel. loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layer']} | {r['solver']} | {r['solve_s']:.2f} | {r['before_s']:.3f} | {r['after_s']:.3f} "
            f"| {r['before_ratio']:.3f} | {r['after_ratio']:.3f} | {r['relative_loss']:.4f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
