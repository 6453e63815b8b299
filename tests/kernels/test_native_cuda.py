"""The Triton kernels compiled for a real GPU (no interpreter), bf16 included, against the fp64 reference.

These run only where CUDA is available (``scripts/gpu_check.sh`` runs them on a lent GPU); on a CPU-only
machine pytest reports them as skipped, and the interpreter tests (test_triton_*.py) cover the same code.
"""

from __future__ import annotations

import os

import pytest
import torch

from bpdq.kernels import select_kernel
from tests.kernels.reference import assert_matches_reference, random_layer

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "") not in ("", "0"),
    reason="needs a CUDA device and TRITON_INTERPRET unset (scripts/gpu_check.sh)",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize(("kernel", "tokens"), [("triton_lut", (1, 3, 8)), ("triton_gemm", (1, 17, 64, 300))])
def test_matches_reference_on_cuda(kernel, tokens, k, group_size, dtype):
    in_features = max(512, 2 * group_size)
    layer = random_layer(k, group_size, 200, in_features, bias=k % 2 == 1, seed=10 * k + group_size).cuda()
    gen = torch.Generator().manual_seed(k)
    for m in tokens:
        x = torch.randn(m, in_features, generator=gen).to(dtype).cuda()
        assert_matches_reference(layer, x, kernel)


@pytest.mark.parametrize(("tokens", "expected"), [(1, "triton_lut"), (8, "triton_lut"), (9, "triton_gemm"), (512, "triton_gemm")])
def test_auto_picks_the_triton_kernels_on_cuda(tokens, expected):
    layer = random_layer(2, 64, 64, 256, bias=False, seed=0).cuda()
    x = torch.randn(tokens, 256, device="cuda", dtype=torch.float16)
    assert select_kernel("auto", layer, x).name == expected
