"""Kernel speed and memory: ``pytest benchmarks/bench_kernels.py --benchmark-json=kernels.json``.

On a GPU: Llama-7B-sized layers (in x out = 4096x4096 and 4096x11008), k = 2, 3 planes, g = 64, 128, fp16
activations; decode (M=1) and prefill (M=512) with ``triton_lut`` / ``triton_gemm`` / ``torch``
(dequantize-then-matmul), against a dense fp16 matmul. Each timed call runs the kernel ``REPS`` times and
synchronises once (the table shows per-batch times; ``extra_info["us_per_call"]`` is per call). Kernels are
called through ``Kernel.forward``: QuantLinear's per-call dispatch checks are not timed.

On the CPU (no GPU): the same grid with layers 4x smaller in each dimension (1024x1024, 1024x2752), only
the torch kernel, against a dense fp32 matmul, plus the memory of a QuantLinear vs the nn.Linear it replaces.

``extra_info`` of every case: ``us_per_call``, ``weight_gbps`` (planes + coefficients read per second),
``speedup_vs_dense`` (dense time / kernel time; > 1 is faster), ``speedup_vs_dequant_matmul``, and on a
GPU ``bandwidth_fraction`` (weight GB/s over the GB/s of a large device copy). Decode targets (GPU, M=1,
k=2, LUT): ``bandwidth_fraction >= 0.6`` and ``speedup_vs_dense >= 3``; ``meets_decode_target`` records it.
Enable ``--log-cli-level=INFO`` for one summary line per case.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from bpdq.kernels import get_kernel, select_kernel
from bpdq.linear import QuantLinear

log = logging.getLogger(__name__)

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.float16 if GPU else torch.float32
SHAPES = [(4096, 4096), (4096, 11008)] if GPU else [(1024, 1024), (1024, 2752)]  # (in, out)
#: Tokens per call; ``BPDQ_BENCH_PREFILL_TOKENS`` changes the prefill size (scripts/gpu_check.sh uses 64).
TOKENS = {"decode": 1, "prefill": int(os.environ.get("BPDQ_BENCH_PREFILL_TOKENS", 512 if GPU else 64))}
REPS = 20 if GPU else 1
ROUNDS = 10 if GPU else 3


def _cases() -> list[tuple[str, str]]:
    """(phase, kernel) pairs that make sense on this machine."""
    if not GPU:
        return [("decode", "torch"), ("prefill", "torch")]
    return [
        ("decode", "triton_lut"),
        ("decode", "triton_gemm"),
        ("decode", "torch"),
        ("prefill", "triton_gemm"),
        ("prefill", "torch"),
    ]


def _sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def _batch(fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        for _ in range(REPS):
            fn()
        _sync()

    return run


def _seconds_per_call(fn: Callable[[], object], rounds: int = ROUNDS) -> float:
    batch = _batch(fn)
    batch()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        batch()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / REPS


def _random_layer(in_features: int, out_features: int, k: int, group_size: int) -> QuantLinear:
    gen = torch.Generator().manual_seed(0)
    layer = QuantLinear(in_features, out_features, planes=k, group_size=group_size)
    layer.planes.copy_(torch.randint(0, 256, layer.planes.shape, dtype=torch.uint8, generator=gen))
    layer.coeffs.copy_((torch.randn(layer.coeffs.shape, generator=gen) * 0.01).half())
    return layer.to(DEVICE)


def _weight_bytes(layer: QuantLinear) -> int:
    return layer.planes.numel() + layer.coeffs.numel() * layer.coeffs.element_size()


@pytest.fixture(scope="module")
def copy_gbps() -> float | None:
    """Achievable memory bandwidth: a 1 GiB device-to-device copy (reads + writes)."""
    if not GPU:
        return None
    src = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _seconds_per_call(lambda: dst.copy_(src)) / 1e9


@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(("phase", "kernel"), _cases(), ids=lambda v: v)
def test_kernel(benchmark, copy_gbps, phase, kernel, shape, k, group_size):
    in_features, out_features = shape
    layer = _random_layer(in_features, out_features, k, group_size)
    x = torch.randn(TOKENS[phase], in_features, device=DEVICE).to(DTYPE)
    dense = layer.quantized_weight().dequantize(DTYPE)
    run = get_kernel(kernel)
    if select_kernel(kernel, layer, x) is not run:
        raise RuntimeError(f"{kernel} does not run here")
    run.forward(layer, x)  # compile / repack outside the timings; QuantLinear's dispatch is not timed

    benchmark.pedantic(_batch(lambda: run.forward(layer, x)), rounds=ROUNDS, warmup_rounds=1)
    seconds = benchmark.stats.stats.median / REPS
    dense_s = _seconds_per_call(lambda: F.linear(x, dense))
    dequant_s = _seconds_per_call(lambda: get_kernel("torch").forward(layer, x))
    gbps = _weight_bytes(layer) / seconds / 1e9
    info = {
        "device": torch.cuda.get_device_name(DEVICE) if GPU else "cpu",
        "tokens": TOKENS[phase],
        "us_per_call": seconds * 1e6,
        "weight_gbps": gbps,
        "speedup_vs_dense": dense_s / seconds,
        "dense_baseline": f"{DTYPE} matmul, {dense_s * 1e6:.1f} us",
        "speedup_vs_dequant_matmul": dequant_s / seconds,
        "quantlinear_bytes": _weight_bytes(layer),
        "linear_bytes_fp32": in_features * out_features * 4,
        "linear_bytes_fp16": in_features * out_features * 2,
    }
    if copy_gbps is not None:
        info["copy_gbps"] = copy_gbps
        info["bandwidth_fraction"] = gbps / copy_gbps
        if phase == "decode" and kernel == "triton_lut" and k == 2:
            info["meets_decode_target"] = info["bandwidth_fraction"] >= 0.6 and info["speedup_vs_dense"] >= 3
    benchmark.extra_info.update(info)
    log.info("%s %s %s k=%d g=%d: %s", phase, kernel, shape, k, group_size, info)


@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_memory_vs_linear(benchmark, shape, k, group_size):
    """Bytes of a QuantLinear's buffers vs an nn.Linear (fp32 and fp16); times building it from a QuantizedWeight."""
    in_features, out_features = shape
    qweight = _random_layer(in_features, out_features, k, group_size).quantized_weight()
    layer = benchmark.pedantic(QuantLinear.from_quantized, (qweight,), rounds=ROUNDS, warmup_rounds=1)
    quant_bytes = sum(b.numel() * b.element_size() for b in layer.state_dict().values())
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    linear_bytes = sum(p.numel() * p.element_size() for p in linear.state_dict().values())
    info = {
        "quantlinear_bytes": quant_bytes,
        "linear_bytes_fp32": linear_bytes,
        "ratio_vs_fp32": linear_bytes / quant_bytes,
        "ratio_vs_fp16": linear_bytes / 2 / quant_bytes,
        "bits_per_weight": 8 * quant_bytes / (in_features * out_features),
    }
    benchmark.extra_info.update(info)
    log.info("memory %s k=%d g=%d: %s", shape, k, group_size, info)
