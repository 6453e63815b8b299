"""Memory and time of quantizing one mixture-of-experts decoder layer, against the dense layer of the same
active size.

A one-layer Qwen3-MoE at Qwen3-30B-A3B's shape (hidden 2048, 128 experts of intermediate 768, 8 active, 32
query / 4 key-value heads of 128, random bf16 weights) is quantized in memory, expert by expert
(:mod:`bpdq.engine.moe`), and so is a one-layer dense Qwen3 whose MLP has the MoE layer's active size
(intermediate 8 x 768 = 6144). Each run is its own subprocess. The table gives the peak RSS (``VmHWM``, counted from the built model on), the
RSS after the model was built (the peak above it is what quantizing costs), the seconds of the whole run, and
for the MoE layer the seconds per expert (both projections) and how the experts were calibrated (routed to
enough tokens, or the pooled Hessian). The target: the MoE layer's peak above its model stays near one
expert's Hessians plus the captured expert inputs, not ``E`` of them.

    python benchmarks/bench_moe.py                                   # the real shape (long: 128 experts)
    python benchmarks/bench_moe.py --experts 8 --samples 4 --seq-len 128   # smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

RECIPE = {"group_size": 128, "grid": {"type": "bitplane", "planes": 2}, "solver": {"type": "bpdq", "iters": 2}}


def rss(field: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(f"{field}:"))


def build(kind: str, args: argparse.Namespace):
    import torch
    import transformers

    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=1, num_attention_heads=32,
                  num_key_value_heads=4, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False)
    if kind == "moe":
        config = transformers.Qwen3MoeConfig(**common, num_experts=args.experts, num_experts_per_tok=args.active,
                                             moe_intermediate_size=args.intermediate, intermediate_size=args.intermediate,
                                             norm_topk_prob=True)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        config = transformers.Qwen3Config(**common, intermediate_size=args.active * args.intermediate)
        cls = transformers.Qwen3ForCausalLM
    config.architectures = [cls.__name__]
    torch.manual_seed(0)
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            for part in p.view(-1, p.shape[-1]).split(4096):  # filled in slices: no full-size float32 copy
                part.copy_(torch.randn(part.shape, generator=gen) * 0.02)
    model.model.rotary_emb.__init__(config)  # its buffers were left empty by to_empty
    return model.eval()


def run_one(kind: str, args: argparse.Namespace) -> dict:
    import torch

    import bpdq

    model = build(kind, args)
    with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) counts from here, not from the build
        f.write("5")
    base = rss("VmRSS")
    ids = [torch.randint(0, args.vocab, (args.seq_len,), generator=torch.Generator().manual_seed(i))
           for i in range(args.samples)]
    start = time.perf_counter()
    report = bpdq.quantize_model(model, None, recipe=RECIPE, calibration=ids, device="cpu", progress=False,
                                 batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    experts = [m for m in report.modules if m.calibration is not None]
    sources: dict[str, int] = {}
    for m in experts[::2]:
        sources[m.calibration["hessian"]] = sources.get(m.calibration["hessian"], 0) + 1
    return {"kind": kind, "peak_rss": rss("VmHWM"), "model_rss": base, "seconds": seconds,
            "seconds_per_expert": sum(m.time_s for m in experts) / max(1, len(experts) // 2) if experts else None,
            "experts": sources}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--active", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--one", choices=["moe", "dense"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    rows = []
    for kind in ("moe", "dense"):
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", kind], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{kind} run failed:\n{proc.stderr}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"hidden {args.hidden}, {args.experts} experts of {args.intermediate}, {args.active} active; "
          f"{args.samples} x {args.seq_len} calibration tokens; recipe {json.dumps(RECIPE)}")
    print(f"{'layer':<6} {'peak RSS':>9} {'model RSS':>9} {'above':>8} {'seconds':>8} {'s/expert':>9}  experts")
    for r in rows:
        per = f"{r['seconds_per_expert']:.2f}" if r["seconds_per_expert"] is not None else "-"
        print(f"{r['kind']:<6} {r['peak_rss'] / 2**30:8.2f}G {r['model_rss'] / 2**30:8.2f}G "
              f"{(r['peak_rss'] - r['model_rss']) / 2**30:7.2f}G {r['seconds']:8.1f} {per:>9}  {r['experts'] or ''}")


if __name__ == "__main__":
    main()
