"""A small lever experiment: the output-aware Hessian stage (``guided_hessian``, bpdq/engine/guided.py) against
the loop's own Hessian, on SmolLM2-135M, at about equal time.

    .venv/bin/python benchmarks/bench_lever.py --json lever.json                 # the variants below, 1 thread
    .venv/bin/python benchmarks/bench_lever.py --variants base,guided --samples 16 --layers 4   # smaller
    .venv/bin/python benchmarks/bench_lever.py --smoke                           # tiny: checks it runs

Every variant is the library's symmetric default recipe (k=2 g=64, the bpdq solver's defaults) on the
built-in ``smollm2-135m`` in float32, ``--samples`` x 512 windows of ``builtin:python-docs`` (seed 0),
the first ``--layers`` decoder layers quantized (all by default), in this process, one after the other,
each on a fresh copy of the model. Each is scored by perplexity on ``builtin:python-docs-test`` and on
bench_quality.py's cross-domain text (Debian's licence texts), ``--eval-windows`` x 512 tokens each, and
its quantization time is the run's (``RunReport.total_time_s``). Variants (``--variants``):

- ``base``: the loop's Hessian;
- ``guided``: ``guided_hessian`` with ``mix`` 1 (``--mix``);
- ``guided-half``: ``guided_hessian`` with ``mix`` 0.5;
- ``base-more``: the loop's Hessian on ``--more-samples`` windows (the equal-time baseline: give it the
  windows that take about the guided run's time).

Times on a shared machine move with the neighbours: compare them within a run only.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import CROSS, EVAL_TEXT, PRIMARY, write_license_text  # noqa: E402

VARIANTS = ("base", "guided", "guided-half", "base-more")


def config(samples: int, layers: int | None, n_layers: int, smoke: bool) -> dict[str, Any]:
    rules = []
    if layers is not None and layers < n_layers:
        rules = [{"match": rf"model\.layers\.({'|'.join(str(i) for i in range(layers, n_layers))})\..*", "skip": True}]
    return {
        "calibration": {"text": "builtin:python-docs", "samples": samples, "seq_len": 64 if smoke else 512, "seed": 0},
        "quantize": {"group_size": 64, "grid": {"type": "bitplane", "planes": 2},
                     "solver": {"type": "bpdq", **({"iters": 2} if smoke else {})}},
        "rules": rules, "device": "cpu", "progress": False, "dtype": "float32",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, in order: {', '.join(VARIANTS)}")
    p.add_argument("--samples", type=int, default=32, help="calibration windows of 512 tokens (default 32)")
    p.add_argument("--more-samples", type=int, default=48, help="windows of the base-more variant (default 48)")
    p.add_argument("--layers", type=int, default=None, help="quantize the first N decoder layers only (default all)")
    p.add_argument("--mix", type=float, default=1.0, help="the guided variant's mix (default 1)")
    p.add_argument("--eval-windows", type=int, default=16, help="512-token windows scored per text (default 16)")
    p.add_argument("--smoke", action="store_true", help="tiny: 2 windows of 64 tokens, 2 layers, 2 iterations, 2 eval windows")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON (after every variant)")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")

    import torch

    import bpdq
    from bpdq.calibration import load_text
    from bpdq.engine.guided import GuidedHessian
    from bpdq.evaluate import perplexity
    from bpdq.models import load_pretrained

    torch.set_num_threads(torch.get_num_threads())  # OMP_NUM_THREADS decides
    if args.smoke:
        args.samples, args.more_samples, args.layers, args.eval_windows = 2, 3, 2, 2
    seq_len = 64 if args.smoke else 512
    fp_model, tokenizer = load_pretrained("smollm2-135m", dtype="float32")
    n_layers = fp_model.config.num_hidden_layers
    with tempfile.TemporaryDirectory(prefix="bpdq-lever-") as tmp:
        licenses = write_license_text(Path(tmp) / "licenses.txt")
        texts = {PRIMARY: load_text(EVAL_TEXT), CROSS: load_text(licenses["spec"])}

    def score(model: Any) -> dict[str, float]:
        return {name: perplexity(model, tokenizer, text, seq_len=seq_len, max_windows=args.eval_windows)
                for name, text in texts.items()}

    fp = score(fp_model)
    print(f"full precision: {fp}", file=sys.stderr, flush=True)
    results: list[dict[str, Any]] = []
    for variant in variants:
        samples = args.more_samples if variant == "base-more" else args.samples
        stages = {"guided": [GuidedHessian(mix=args.mix)], "guided-half": [GuidedHessian(mix=0.5)]}.get(variant, [])
        model = copy.deepcopy(fp_model)
        start = time.perf_counter()
        report = bpdq.quantize(model, config(samples, args.layers, n_layers, args.smoke), tokenizer=tokenizer,
                               stages=stages)
        wall = time.perf_counter() - start
        ppl = score(model)
        results.append({"variant": variant, "samples": samples, "layers": args.layers or n_layers,
                        "stages": report.stages, "extra": report.extra, "time_s": report.total_time_s or wall,
                        "wall_s": wall, "perplexity": ppl, "ratio": {n: ppl[n] / fp[n] for n in ppl}})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        del model
        if args.json:
            args.json.write_text(json.dumps({"full_precision": fp, "eval_windows": args.eval_windows,
                                             "results": results}, indent=2) + "\n")
    print(f"| variant | windows | time (s) | {PRIMARY} ratio | {CROSS} ratio |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['samples']} | {r['time_s']:.0f} | {r['ratio'][PRIMARY]:.3f} | {r['ratio'][CROSS]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
