"""Memory of quantizing a model read from disk one decoder layer at a time.

A synthetic Llama-shaped model (random bf16 weights, hidden 2048, intermediate 5632, vocabulary 32000) is
written as safetensors shards for each layer count (16 and 32: ~0.8B and ~1.6B parameters), then quantized
from the directory with data-free RTN, GPTQ 2-bit and BPDQ k=2 with 2 iterations (a few calibration windows:
the point is memory), each run in its own subprocess. The table gives the peak RSS (the kernel's ``VmHWM`` of the run's
process), seconds per layer, the checkpoint size and the input's bf16 size, then the targets: the 32-layer
peak at most 1.1x the 16-layer peak (cost grows with the layer, not the model) and at most 35% of the
32-layer model's bf16 size.

    python benchmarks/bench_memory.py                                  # the real run (tens of minutes)
    python benchmarks/bench_memory.py --hidden 128 --intermediate 256 --vocab 512 --layers 2,4  # smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = {
    "rtn": {"grid": {"type": "bitplane", "planes": 2}, "solver": "rtn"},
    "gptq-2": {"grid": {"type": "uniform", "bits": 2}, "solver": "gptq"},
    "bpdq-2": {"grid": {"type": "bitplane", "planes": 2}, "solver": {"type": "bpdq", "iters": 2}},  # memory does not depend on iters
}


def write_model(directory: Path, *, layers: int, hidden: int, intermediate: int, vocab: int) -> int:
    """A random Llama written shard by shard (never whole in memory); returns its bf16 bytes."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from bpdq.checkpoint import unique_state_dict
    from bpdq.shards import ShardWriter

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 512),
        max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    directory.mkdir(parents=True)
    writer = ShardWriter(directory, "500MB")
    gen = torch.Generator().manual_seed(0)
    units: dict[str, dict[str, torch.Tensor]] = {}  # a decoder layer each, then the rest
    for name, meta in unique_state_dict(skeleton).items():
        units.setdefault(name.split(".")[2] if name.startswith("model.layers.") else "rest", {})[name] = meta
    for unit in units.values():
        writer.add({
            name: torch.ones(meta.shape, dtype=torch.bfloat16) if name.endswith("norm.weight")
            else (torch.randn(meta.shape, generator=gen) * 0.02).to(torch.bfloat16)
            for name, meta in unit.items()
        })
    writer.close()
    config.save_pretrained(directory)
    return sum(m.numel() * 2 for unit in units.values() for m in unit.values())


def run_one(model_dir: str, method: str, output: str, samples: int, seq_len: int) -> dict:
    """One quantization in this process: time and the kernel's peak RSS."""
    import torch

    import bpdq

    torch.manual_seed(0)
    ids = [torch.randint(0, 256, (seq_len,), generator=torch.Generator().manual_seed(i)) for i in range(samples)]
    start = time.perf_counter()
    report = bpdq.quantize_model(model_dir, recipe={"group_size": 64, **METHODS[method]}, calibration=ids,
                                 device="cpu", progress=False, output=output)
    elapsed = time.perf_counter() - start
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return {"seconds": elapsed, "peak_rss": peak, "checkpoint_bytes": report.checkpoint_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="16,32", help="layer counts, comma-separated")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--samples", type=int, default=4, help="calibration windows (GPTQ, BPDQ)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--workdir", default=None, help="where models and checkpoints go (default: a temp dir)")
    parser.add_argument("--run", nargs=3, metavar=("MODEL_DIR", "METHOD", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(*args.run, args.samples, args.seq_len)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bpdq-bench-memory-"))
    counts = sorted(int(x) for x in args.layers.split(","))
    methods = args.methods.split(",")
    sizes = {n: write_model(work / f"llama-{n}", layers=n, hidden=args.hidden, intermediate=args.intermediate,
                            vocab=args.vocab) for n in counts}
    print(f"hidden {args.hidden}, intermediate {args.intermediate}, vocabulary {args.vocab}\n")
    print("| method | layers | bf16 GB | peak RSS GB | s/layer | checkpoint GB |")
    print("|---|---|---|---|---|---|", flush=True)
    peaks: dict[tuple[str, int], int] = {}
    for method in methods:  # every size of a method, then the next: a stopped run keeps whole methods
        for n in counts:
            out = work / f"out-{n}-{method}"
            proc = subprocess.run(
                [sys.executable, __file__, "--run", str(work / f"llama-{n}"), method, str(out), "--samples",
                 str(args.samples), "--seq-len", str(args.seq_len)], capture_output=True, text=True, check=False,
            )
            if proc.returncode:
                sys.exit(f"{method} on {n} layers failed:\n{proc.stderr}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            peaks[(method, n)] = r["peak_rss"]
            print(f"| {method} | {n} | {sizes[n] / 1e9:.2f} | {r['peak_rss'] / 1e9:.2f} | {r['seconds'] / n:.1f} | "
                  f"{r['checkpoint_bytes'] / 1e9:.3f} |", flush=True)
    if len(counts) >= 2:
        small, big = counts[0], counts[-1]
        print()
        for method in methods:
            ratio = peaks[(method, big)] / peaks[(method, small)]
            share = peaks[(method, big)] / sizes[big]
            print(f"{method}: peak {big}/{small} layers = {ratio:.2f} (target <= 1.1), peak / bf16 size of "
                  f"{big} layers = {share:.0%} (target <= 35%)")

if __name__ == "__main__":
    main()
