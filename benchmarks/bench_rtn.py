"""Data-free RTN against RTN run through the calibration passes (issue 10: at least 10x faster).

RTN uses no Hessian, so a run whose every solver is RTN skips calibration: no text, no layer forward, the
weights straight to the grid. Before that, RTN ran every calibration pass like GPTQ and BPDQ. This script
times both in one process on the built-in SmolLM2-135M (float32, every decoder linear, k=2 bit-planes,
g=64): the data-free run, and the same RTN behind a solver that declares it needs a Hessian
(``rtn-calibrated``, registered here: it ignores the Hessian), which makes the pipeline capture the inputs,
accumulate every group's Hessians and run every layer forward on the main job's calibration (128 x 512
tokens of ``builtin:python-docs`` by default), as calibrated RTN did. Both runs must give the same weights
(checked); the table gives the seconds of each and their ratio.

    .venv/bin/python benchmarks/bench_rtn.py                 # about 2-5 minutes on one core
    .venv/bin/python benchmarks/bench_rtn.py --samples 8     # smoke run
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=128, help="calibration windows of the calibrated run")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import bpdq
    from bpdq.models import load_pretrained
    from bpdq.solvers.rtn import RTN

    @bpdq.SOLVERS.register("rtn-calibrated")
    class CalibratedRTN(RTN):
        """RTN that asks for a Hessian (and ignores it): the pipeline runs every calibration pass for it."""

        requires_hessian = True

        def _solve(self, W, H, grid, group_size):  # type: ignore[no-untyped-def]
            codes, coeffs, stats = super()._solve(W, None, grid, group_size)
            stats.proxy_loss = stats.relative_loss = 0.0  # not compared; no second pass over H
            return codes, coeffs, stats

    model, tok = load_pretrained("smollm2-135m", dtype="float32")
    recipe = {"group_size": 64, "grid": {"type": "bitplane", "planes": 2}}
    calibration = {"text": "builtin:python-docs", "samples": args.samples, "seq_len": args.seq_len, "seed": 0}
    rows = []
    results = {}
    for name, solver, calib in [("data-free", "rtn", None), ("calibrated", "rtn-calibrated", calibration)]:
        m = copy.deepcopy(model)
        start = time.perf_counter()
        bpdq.quantize_model(m, tok, recipe={**recipe, "solver": solver}, calibration=calib, device="cpu", progress=False)
        rows.append((name, time.perf_counter() - start))
        results[name] = {k: v.clone() for k, v in m.state_dict().items() if "planes" in k or "coeffs" in k}
    same = results["data-free"].keys() == results["calibrated"].keys() and all(
        torch.equal(v, results["calibrated"][k]) for k, v in results["data-free"].items()
    )
    print(f"SmolLM2-135M, RTN k=2 g=64, float32, {torch.get_num_threads()} thread(s); calibrated run: "
          f"{args.samples} x {args.seq_len} tokens\n")
    print("| run | seconds |\n|---|---|")
    for name, secs in rows:
        print(f"| {name} | {secs:.1f} |")
    ratio = rows[1][1] / rows[0][1]
    print(f"\ndata-free is {ratio:.1f}x faster (target >= 10x); same packed weights: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
