"""One process vs several: ``bpdq quantize`` under ``torchrun`` on SmolLM2-135M, BPDQ k=2.

SmolLM2-135M-Instruct is written once as a safetensors directory (``bpdq export``), then quantized from that
directory (one decoder layer at a time) by ``python -m torch.distributed.run --nproc_per_node=N -m bpdq.cli
quantize`` for each N of ``--procs`` (gloo on the CPU, nccl with one GPU per rank), each rank with
``cpu_count // N`` threads (``--threads`` to fix it). Recipe: bit-plane k=2, g=64, BPDQ with ``--iters`` iterations, ``--samples``
calibration windows of ``--seq-len`` tokens (batches of 8: at least 8*N windows). The table gives the wall
time of the whole command, the speed-up over one process, each rank's peak RSS (the kernel's ``VmHWM``,
written at exit by a small plugin) and whether the checkpoint's bytes equal the one-process checkpoint's
(they do when every rank runs with the same thread count as the one process: ``--threads``; with other
thread counts the float32 matrix products round differently, in one process as in several).

    python benchmarks/bench_distributed.py                   # SmolLM2, 1 and 2 processes (tens of minutes on 2 cores)
    python benchmarks/bench_distributed.py --tiny            # smoke run: a tiny random Llama, seconds

``--synthetic``: the scaling check instead: a random bfloat16 Llama with hidden 1024 (intermediate 2816, 16/8
heads) and two decoder layers, GPTQ over the 2-bit uniform grid, g = 64, 64 windows of 512 tokens, one
thread per process (``--threads 1``), one process against ``torchrun --nproc_per_node=2``: the speed-up
(target >= 1.7) with byte-identical checkpoints. With ``--tiny`` it shrinks to a smoke run. ``--asymmetric false``
turns the library's default asymmetric calibration off; ``--solver bpdq`` solves with BPDQ k=2 instead. ``--rounds R`` runs the process counts in turn R
times and gives the median time of each (the runs of one round see the same spell of a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RSS_PLUGIN = """
import atexit, json, os

def _peak():
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    path = os.path.join(os.environ["BPDQ_BENCH_RSS_DIR"], f"rank-{os.environ.get('RANK', '0')}.json")
    with open(path, "w") as f:
        json.dump({"peak_rss": peak}, f)

atexit.register(_peak)
_exit = os._exit


def _exit_with_peak(code):  # a distributed rank leaves through os._exit, which skips atexit
    _peak()
    _exit(code)


os._exit = _exit_with_peak
"""


def tiny_model(directory: Path) -> None:
    """A random 4-layer Llama (hidden 128) with the test suite's tiny tokenizer, as a safetensors directory."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny_models import tiny_model_dir

    tiny_model_dir(directory, "llama", layers=4, hidden_size=128, intermediate_size=256)


def synthetic_model(directory: Path, tiny: bool) -> None:
    """A random bfloat16 Llama, two decoder layers, hidden 1024 (``tiny``: 128), as a safetensors directory."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny_models import tiny_model_dir

    sizes = (dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2) if tiny
             else dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=8))
    tiny_model_dir(directory, "llama", layers=2, max_shard_size="2GB", dtype=torch.bfloat16,
                   max_position_embeddings=512, tie_word_embeddings=False, **sizes)


def run_procs(n: int, config: Path, output: Path, work: Path, threads: int | None) -> dict:
    rss_dir = work / f"rss-{n}"
    rss_dir.mkdir(exist_ok=True)
    plugin = work / "rss_plugin.py"
    plugin.write_text(RSS_PLUGIN)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or max(1, (os.cpu_count() or 1) // n)), BPDQ_BENCH_RSS_DIR=str(rss_dir),
               HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "bpdq.cli",
               "quantize", str(config), "-o", str(output), "--plugin", str(plugin), "--json"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{n} processes failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    peaks = [json.loads((rss_dir / f"rank-{r}.json").read_text())["peak_rss"] for r in range(n)]
    return {"procs": n, "seconds": seconds, "peak_rss": peaks}


def checkpoint_bytes(out: Path) -> bytes:
    """The checkpoint's safetensors files, concatenated in name order (one file or shards)."""
    return b"".join(p.read_bytes() for p in sorted(out.glob("*.safetensors")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", default="1,2", help="process counts, comma-separated (the first is the reference)")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--iters", type=int, default=10, help="BPDQ iterations")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per rank for every process count (default: cpu_count // N)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: a tiny random Llama, 16 windows of 32 tokens")
    parser.add_argument("--workdir", default=None, help="where the model and checkpoints go (default: a temp dir)")
    parser.add_argument("--asymmetric", choices=["auto", "false"], default="auto",
                        help="calibration.asymmetric (auto, the library default: on for these recipes; false: off)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the process counts in turn this many times; the table gives medians")
    parser.add_argument("--solver", choices=["gptq", "bpdq"], default="gptq",
                        help="--synthetic: GPTQ over the uniform 2-bit grid (the default) or BPDQ k=2 (--iters)")
    parser.add_argument("--synthetic", action="store_true",
                        help="the scaling check: hidden-1024 two-layer bf16 Llama, GPTQ 2-bit, 64 x 512 tokens, 1 thread per process")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bpdq-bench-distributed-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        model_dir = work / ("synthetic-128" if args.tiny else "synthetic-1024")
        if not model_dir.exists():
            synthetic_model(model_dir, args.tiny)
        samples, seq_len, group = (16, 64, 64) if args.tiny else (64, 512, 64)
        quantize = ({"group_size": group, "grid": {"type": "uniform", "bits": 2}, "solver": {"type": "gptq"}}
                    if args.solver == "gptq" else
                    {"group_size": group, "grid": {"type": "bitplane", "planes": 2},
                     "solver": {"type": "bpdq", "iters": 2 if args.tiny else args.iters}})
        args.threads = args.threads or 1
        what = "GPTQ 2-bit" if args.solver == "gptq" else f"BPDQ k=2 ({args.iters} iterations)"
        title = f"synthetic bf16 Llama (hidden {128 if args.tiny else 1024}, 2 layers), {what} g={group}"
    else:
        model_dir = work / ("tiny-llama" if args.tiny else "smollm2-135m")
        if not model_dir.exists():
            if args.tiny:
                tiny_model(model_dir)
            else:
                subprocess.run([sys.executable, "-m", "bpdq.cli", "export", "smollm2-135m", str(model_dir)], check=True)
        samples, seq_len, group = (16, 32, 32) if args.tiny else (args.samples, args.seq_len, 64)
        quantize = {"group_size": group, "grid": {"type": "bitplane", "planes": 2},
                    "solver": {"type": "bpdq", "iters": 2 if args.tiny else args.iters}}
        title = f"{'tiny random Llama' if args.tiny else 'SmolLM2-135M'}, BPDQ k=2 g={group}"
    config = work / "strategy.json"
    config.write_text(json.dumps({
        "model": str(model_dir),
        "calibration": {"text": "builtin:python-docs", "samples": samples, "seq_len": seq_len, "seed": 0,
                        "asymmetric": args.asymmetric == "auto" and "auto"},
        "quantize": quantize,
        "device": "cpu",
    }))
    counts = [int(x) for x in args.procs.split(",")]
    seconds: dict[int, list[float]] = {n: [] for n in counts}
    peaks: dict[int, list[int]] = {}
    same: dict[int, bool] = dict.fromkeys(counts, True)
    reference = None
    for _ in range(args.rounds):  # the process counts in turn, so that a slow spell of the machine hits each
        for n in counts:
            out = work / f"out-{n}"
            for old in (out, work / f".{out.name}.bpdq-resume"):  # a previous run's output and resume state
                shutil.rmtree(old, ignore_errors=True)
            r = run_procs(n, config, out, work, args.threads)
            weights = checkpoint_bytes(out)
            reference = reference or weights
            same[n] = same[n] and bool(weights) and weights == reference
            seconds[n].append(r["seconds"])
            peaks[n] = [max(a, b) for a, b in zip(peaks.get(n, r["peak_rss"]), r["peak_rss"])]
    base = statistics.median(seconds[counts[0]])
    rows = []
    for n in counts:
        mid = statistics.median(seconds[n])
        each = ", ".join(f"{t:.1f}" for t in seconds[n])
        rows.append(f"| {n} | {mid:.1f} ({each}) | {base / mid:.2f} | "
                    f"{', '.join(f'{p / 1e9:.2f}' for p in peaks[n])} | {'yes' if same[n] else 'no'} |")
    print(f"{title}, {samples} windows x {seq_len} tokens, asymmetric calibration {args.asymmetric}, "
          f"{args.threads or 'cpu_count // N'} thread(s) per process")
    print("| processes | seconds: median (each round) | speed-up of the medians | peak RSS per rank (GB) | "
          "same bytes as 1 process |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
