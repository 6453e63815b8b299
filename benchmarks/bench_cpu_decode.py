"""CPU decode speed of the native ``cpu_lut`` kernel: single layers at M=1 and greedy decoding of SmolLM2.

In one run, for each thread count (``--threads``, default 1,2):

1. memory bandwidth: a STREAM-like copy of a 256 MiB fp32 buffer (GB/s counts bytes read + written);
2. per layer shape (out x in) 576x576, 1536x576, 4096x4096, 11008x4096, 4096x11008 at M=1, k=2, g=64: the
   time of ``QuantLinear`` with the ``cpu_lut`` kernel (dispatch included) against a dense fp32 and bf16
   ``F.linear``, and the kernel's effective GB/s of weight bytes (planes + coefficients) and that as a
   fraction of the copy bandwidth;
3. end to end: greedy decode tokens/s of SmolLM2-135M quantized with BPDQ k=2 (``--checkpoint DIR``, or
   built here with RTN, g=64: speed does not depend on the solver) against the fp32
   and bf16 models; tokens/s = (N - 1) / (time of N new tokens - time of 1), so prefill is excluded.
   The model built here uses RTN on the 2-bit uniform grid, stored as 2 planes + 3 coefficients per group
   like every BPDQ weight (about 10 s; RTN on the bit-plane grid takes minutes): the kernel's speed
   depends on the format only, not on how the coefficients were fitted.

Targets (issue 12): 4096x4096 and larger at M=1 >= 4x dense fp32 and >= 50% of the copy bandwidth;
SmolLM2 k=2 decode >= 1.5x the fp32 and >= 1.2x the bf16 model's tokens/s.

    python benchmarks/bench_cpu_decode.py                     # the full run (minutes), a markdown table
    python benchmarks/bench_cpu_decode.py --checkpoint runs/smollm2-bpdq-2
    python benchmarks/bench_cpu_decode.py --smoke             # tiny shapes and a tiny model: checks it runs

Run it on a quiet machine: timings are medians of repeated calls, but another process on a 2-core machine
changes them by more than the differences measured.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bpdq.kernels import cpu_lut  # noqa: E402
from bpdq.linear import QuantLinear  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (4096, 4096), (11008, 4096), (4096, 11008)]
SMOKE_SHAPES = [(64, 64), (96, 64)]
K, GROUP = 2, 64
PROMPT = "The capital of France is"


def median_time(fn, *, min_time: float, max_reps: int = 1000) -> float:
    """Median seconds per call over repeated calls (after two warm-up calls), running about ``min_time``."""
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 5 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, min_time: float) -> float:
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_time(lambda: dst.copy_(src), min_time=min_time) / 1e9


def random_layer(out_features: int, in_features: int) -> QuantLinear:
    gen = torch.Generator().manual_seed(0)
    layer = QuantLinear(in_features, out_features, planes=K, group_size=GROUP, kernel="cpu_lut")
    layer.planes.copy_(torch.randint(0, 256, layer.planes.shape, dtype=torch.uint8, generator=gen))
    layer.coeffs.copy_((torch.randn(layer.coeffs.shape, generator=gen) * 0.02).half())
    return layer


def bench_layers(shapes, bandwidth: float, min_time: float) -> list[dict]:
    rows = []
    for out_features, in_features in shapes:
        layer = random_layer(out_features, in_features)
        x = torch.randn(1, in_features)
        w32 = torch.randn(out_features, in_features)
        w16, x16 = w32.bfloat16(), x.bfloat16()
        weight_bytes = layer.planes.nbytes + layer.coeffs.nbytes
        with torch.no_grad():
            t_lut = median_time(lambda: layer(x), min_time=min_time)
            t_fp32 = median_time(lambda: F.linear(x, w32), min_time=min_time)
            t_bf16 = median_time(lambda: F.linear(x16, w16), min_time=min_time)
        gbps = weight_bytes / t_lut / 1e9
        rows.append({
            "shape": f"{out_features}x{in_features}", "lut_us": t_lut * 1e6, "fp32_us": t_fp32 * 1e6,
            "bf16_us": t_bf16 * 1e6, "vs_fp32": t_fp32 / t_lut, "vs_bf16": t_bf16 / t_lut, "gbps": gbps,
            "bw_frac": gbps / bandwidth,
        })  # fmt: skip
    return rows


def quantize_linears(model: nn.Module) -> nn.Module:
    """Every decoder linear -> QuantLinear (RTN on the k-bit uniform grid, k planes, g=64), in place."""
    for module in list(model.model.layers.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                q = QuantLinear.from_linear(child, grid={"type": "uniform", "bits": K}, group_size=GROUP)
                setattr(module, name, q)
    return model


def load_models(smoke: bool, checkpoint: str | None) -> tuple[dict[str, nn.Module], torch.Tensor]:
    import bpdq

    if smoke:
        from tests.tiny_models import tiny_model

        fp32 = tiny_model("llama", layers=2, seed=0)
        ids = torch.tensor([[1, 5, 9, 14]])
    else:
        from bpdq.models import load_pretrained

        fp32, tok = load_pretrained("smollm2-135m")
        ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    fp32.eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    quant = bpdq.load(checkpoint)[0] if checkpoint else quantize_linears(copy.deepcopy(fp32))
    quant.eval()
    return {"fp32": fp32, "bf16": bf16, f"bpdq k={K} (cpu_lut)": quant}, ids


def decode_tokens_per_s(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    def run(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    run(2)  # warm-up (first-call relayout, allocator)
    t1 = min(run(1) for _ in range(2))
    tn = min(run(new_tokens) for _ in range(2))
    return (new_tokens - 1) / max(tn - t1, 1e-9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--checkpoint", default=None, help="a saved BPDQ k=2 SmolLM2 checkpoint directory")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per decode measurement")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per layer timing")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and a tiny model: only checks it runs")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    if cpu_lut.native().reason is not None:
        parser.error(f"the native kernel is unavailable: {cpu_lut.native().reason}")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    copy_bytes = (4 << 20) if args.smoke else (256 << 20)
    min_time = 0.05 if args.smoke else args.min_time
    new_tokens = 4 if args.smoke else args.tokens
    models, ids = load_models(args.smoke, args.checkpoint)

    out = [f"cpu_lut path: {cpu_lut.native().best}; k={K}, g={GROUP}, M=1; torch {torch.__version__}", ""]
    out.append("| threads | case | cpu_lut | dense fp32 | dense bf16 | vs fp32 | vs bf16 | weight GB/s | of copy BW |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for t in threads:
        torch.set_num_threads(t)
        bandwidth = copy_bandwidth(copy_bytes, min_time)
        out.append(f"| {t} | copy bandwidth | | | | | | {bandwidth:.1f} | 100% |")
        for r in bench_layers(shapes, bandwidth, min_time):
            out.append(
                f"| {t} | {r['shape']} | {r['lut_us']:.0f} us | {r['fp32_us']:.0f} us | {r['bf16_us']:.0f} us | "
                f"{r['vs_fp32']:.2f}x | {r['vs_bf16']:.2f}x | {r['gbps']:.1f} | {100 * r['bw_frac']:.0f}% |"
            )
        speeds = {name: decode_tokens_per_s(model, ids, new_tokens) for name, model in models.items()}
        quant = speeds[f"bpdq k={K} (cpu_lut)"]
        out.append(
            f"| {t} | decode tok/s | {quant:.2f} | {speeds['fp32']:.2f} | {speeds['bf16']:.2f} | "
            f"{quant / speeds['fp32']:.2f}x | {quant / speeds['bf16']:.2f}x | | |"
        )
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
