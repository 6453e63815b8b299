"""Perplexity effect of the ``cpu_lut`` kernel's integer lookup tables (issue 12: at most 0.3% on SmolLM2 k=2).

The AVX2 and AVX-512 paths of ``cpu_lut`` round their per-token lookup tables to integers (one scale per token and group;
see ``bpdq/kernels/cpu_lut.py``), so its outputs differ from the exact ones by a bounded amount. This script
measures what that does to a model's quality:

1. a SmolLM2-135M BPDQ k=2 g=64 checkpoint (``--checkpoint DIR``), or one quantized here first: the main job's
   config (``configs/smollm2-bpdq-k2.yaml``) with 16 calibration windows, 3 solver iterations and symmetric
   calibration (a few minutes on 2 cores; perplexity ~40 instead of the full symmetric job's ~35), through
   ``bpdq quantize`` in a
   subprocess, written to ``--workdir``. Not RTN: RTN at 2 bits leaves SmolLM2 at a perplexity of ~2.6e5,
   a model whose outputs are noise and whose perplexity moves with any perturbation;
2. perplexity on ``builtin:python-docs-test`` (``bpdq.evaluate.perplexity``; ``--windows`` x ``--seq-len``
   tokens, default 4 x 512) with the ``torch`` kernel (dequantize + matmul: the reference);
3. the same with the ``cpu_lut`` kernel forced onto each path of ``--isas`` (``BPDQ_CPU_ISA``; default
   ``avx2``, int16 tables) and onto the lookup-table path for every linear call: the library uses the
   tables only for ``M <= 8`` rows (decode), so here each linear's input is cut into pieces of at most 8 rows
   (a wrapper installed on the model's layers by this script). The exact fp32-table path ``portable`` in
   ``--isas`` is the control: it shows the change from summation order alone.

It prints each perplexity and its relative change against the torch kernel.

    python benchmarks/bench_lut_precision.py                                # quantize, then the AVX2 tables
    python benchmarks/bench_lut_precision.py --isas avx2,avx512,portable    # plus the exact fp32-table control
    python benchmarks/bench_lut_precision.py --checkpoint runs/smollm2-bpdq-k2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bpdq.calibration import load_text  # noqa: E402
from bpdq.evaluate import perplexity  # noqa: E402
from bpdq.kernels import cpu_lut  # noqa: E402
from bpdq.linear import QuantLinear  # noqa: E402

CONFIG = ROOT / "configs" / "smollm2-bpdq-k2.yaml"
QUICK = ["calibration.samples=16", "quantize.solver.iters=3", "calibration.asymmetric=false"]
TEXT = "builtin:python-docs-test"


def quantize(workdir: Path) -> Path:
    """The quick k=2 checkpoint (see the module docstring) in ``workdir``; reused if it is already there."""
    out = workdir / "smollm2-bpdq-k2-quick"
    if not (out / "bpdq_summary.json").is_file():
        sets = [arg for value in QUICK for arg in ("--set", value)]
        cmd = [sys.executable, "-m", "bpdq.cli", "quantize", str(CONFIG), "--output", str(out), "--overwrite", *sets]
        subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def use_kernel(model: nn.Module, kernel: str, rows: int | None) -> None:
    """Set every QuantLinear's kernel; with ``rows``, each call runs on pieces of at most ``rows`` rows."""
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            layer.set_kernel(kernel)
            layer.__dict__.pop("forward", None)  # the class's forward again
            if rows is not None:
                layer.forward = _pieces(layer, rows)


def _pieces(layer: QuantLinear, rows: int):
    whole = type(layer).forward.__get__(layer)

    def forward(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.cat([whole(piece) for piece in x2.split(rows)])
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return forward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--isas", default="avx2", help="comma-separated cpu_lut paths to force (default avx2)")
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows (default 4)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--checkpoint", default=None, help="a BPDQ k=2 SmolLM2 checkpoint (default: quantize one)")
    parser.add_argument("--workdir", default="runs/bench-lut-precision", help="where the quick checkpoint goes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import bpdq

    checkpoint = Path(args.checkpoint) if args.checkpoint else quantize(Path(args.workdir).resolve())
    model, tok = bpdq.load(checkpoint, kernel="torch")
    model = model.float().eval()
    text = load_text(TEXT)

    def ppl() -> tuple[float, float]:
        t0 = time.perf_counter()
        value = perplexity(model, tok, text, seq_len=args.seq_len, max_windows=args.windows)
        return value, time.perf_counter() - t0

    use_kernel(model, "torch", None)
    ref, seconds = ppl()
    out = [f"{checkpoint}; perplexity on {TEXT}, {args.windows} x {args.seq_len} tokens", ""]
    out.append("| kernel | path | perplexity | change vs torch | time |")
    out.append("|---|---|---|---|---|")
    out.append(f"| torch | dequantize + matmul | {ref:.4f} | | {seconds:.0f} s |")
    for isa in args.isas.split(","):
        os.environ[cpu_lut.ISA_ENV] = isa
        cpu_lut.native.cache_clear()
        nat = cpu_lut.native()
        if nat.reason is not None:
            parser.error(f"cpu_lut cannot run on path {isa}: {nat.reason}")
        use_kernel(model, "cpu_lut", cpu_lut.MAX_TOKENS)
        value, seconds = ppl()
        tables = "integer tables" if isa in cpu_lut.INT_TABLE_ISAS else "fp32 tables"
        out.append(
            f"| cpu_lut, <= {cpu_lut.MAX_TOKENS} rows a call | {isa} ({tables}) | {value:.4f} | "
            f"{100 * (value / ref - 1):+.3f}% | {seconds:.0f} s |"
        )
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
