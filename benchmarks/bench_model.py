"""Quality and speed of whole-model quantization on the built-in SmolLM2-135M.

Each method runs in its own subprocess (so peak memory is per run): load the model, quantize it with
128 x 512 calibration tokens from ``builtin:python-docs`` (skipped for ``fp``), and measure perplexity on
the held-out ``builtin:python-docs-test`` split (non-overlapping 512-token windows).

    python benchmarks/bench_model.py                      # every method, a markdown table
    python benchmarks/bench_model.py --methods fp,bpdq-2  # some of them
    pytest benchmarks/bench_model.py --benchmark-only     # the timed BPDQ k=2 run (target: < 5 min, 2 cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time

METHODS: dict[str, dict | None] = {
    "fp": None,
    "rtn-2": {"grid": {"type": "uniform", "bits": 2}, "solver": "rtn"},
    "gptq-2": {"grid": {"type": "uniform", "bits": 2}, "solver": "gptq"},
    "bpdq-2": {"grid": {"type": "bitplane", "planes": 2}, "solver": {"type": "bpdq", "iters": 10}},
    "rtn-3": {"grid": {"type": "uniform", "bits": 3}, "solver": "rtn"},
    "gptq-3": {"grid": {"type": "uniform", "bits": 3}, "solver": "gptq"},
    "bpdq-3": {"grid": {"type": "bitplane", "planes": 3}, "solver": {"type": "bpdq", "iters": 10}},
}
CALIBRATION = {"text": "builtin:python-docs", "samples": 128, "seq_len": 512, "seed": 0}
EVAL_TEXT = "builtin:python-docs-test"


def run_one(method: str, *, samples: int, eval_windows: int | None) -> dict:
    import torch

    import bpdq
    from bpdq.calibration import load_text
    from bpdq.evaluate import perplexity
    from bpdq.models import load_pretrained

    torch.manual_seed(0)
    model, tok = load_pretrained("smollm2-135m")
    result: dict = {"method": method, "threads": torch.get_num_threads()}
    recipe = METHODS[method]
    if recipe is not None:
        start = time.perf_counter()
        report = bpdq.quantize_model(
            model, tok, recipe={"group_size": 64, **recipe}, calibration={**CALIBRATION, "samples": samples}, device="cpu", progress=True
        )
        result["quantize_s"] = time.perf_counter() - start
        result["bpw"] = report.avg_bpw_quantized
    result["perplexity"] = perplexity(model, tok, load_text(EVAL_TEXT), seq_len=512, max_windows=eval_windows)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def test_bpdq_2bit_whole_model(benchmark):
    """The timed target: whole-model BPDQ k=2 (10 iterations, 128 x 512 calibration tokens)."""
    import bpdq
    from bpdq.models import load_pretrained

    model, tok = load_pretrained("smollm2-135m")

    def run():
        return bpdq.quantize_model(model, tok, recipe={"group_size": 64, **METHODS["bpdq-2"]}, calibration=CALIBRATION, device="cpu", progress=False)

    report = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["avg_bpw"] = report.avg_bpw_quantized
    benchmark.extra_info["modules"] = report.n_quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--samples", type=int, default=128, help="calibration windows of 512 tokens")
    parser.add_argument("--eval-windows", type=int, default=None, help="cap on 512-token evaluation windows")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.one:
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.one}: %(message)s")
        print(json.dumps(run_one(args.one, samples=args.samples, eval_windows=args.eval_windows)), flush=True)
        return
    results = []
    for method in args.methods.split(","):
        if method not in METHODS:
            parser.error(f"unknown method {method!r}; choose from {list(METHODS)}")
        cmd = [sys.executable, __file__, "--one", method, "--samples", str(args.samples)]
        if args.eval_windows:
            cmd += ["--eval-windows", str(args.eval_windows)]
        start = time.perf_counter()
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
        result = json.loads(out) | {"wall_s": time.perf_counter() - start}
        results.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
    fp = next((r["perplexity"] for r in results if r["method"] == "fp"), None)
    print("| method | bpw | perplexity | x FP | quantize time (s) | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['perplexity'] / fp:.2f}" if fp else "-"
        bpw = f"{r['bpw']:.3f}" if "bpw" in r else "16/32"
        qt = f"{r['quantize_s']:.0f}" if "quantize_s" in r else "-"
        print(f"| {r['method']} | {bpw} | {r['perplexity']:.3f} | {ratio} | {qt} | {r['peak_rss_gib']:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
