"""Dispatch rules of the Triton kernels (bpdq/kernels/_triton.py): which kernel ``auto`` and explicit names get.

The CUDA probe is monkeypatched to dispatch as if on a GPU; nothing here launches a kernel.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bpdq.kernels import KernelUnavailableError, _triton, select_kernel, triton_gemm, triton_lut
from bpdq.linear import QuantLinear

TRITON_KERNELS = ("triton_gemm", "triton_lut")


def layer(planes: int = 2, group_size: int = 64) -> QuantLinear:
    return QuantLinear(128, 16, planes=planes, group_size=group_size)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Dispatch as on a GPU (without the interpreter)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_triton, "on_cuda", lambda x: True)


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_auto_on_cuda_uses_lut_for_decode_and_gemm_for_prefill(fake_cuda, dtype):
    lin = layer()
    for m in range(1, 9):
        assert select_kernel("auto", lin, torch.zeros(m, 128, dtype=dtype)).name == "triton_lut"
    for m in (9, 17, 64, 4096):
        assert select_kernel("auto", lin, torch.zeros(m, 128, dtype=dtype)).name == "triton_gemm"


@pytest.mark.parametrize(
    ("lin", "dtype"),
    [(layer(planes=5), torch.float16), (layer(group_size=16), torch.float16), (layer(), torch.float64)],
    ids=["5-planes", "group-16", "float64"],
)
def test_auto_on_cuda_falls_back_to_torch_for_unsupported_layers(fake_cuda, lin, dtype):
    for m in (1, 64):
        assert select_kernel("auto", lin, torch.zeros(m, 128, dtype=dtype)).name == "torch"


@pytest.mark.parametrize("interpreted", [False, True])
def test_auto_on_cpu_is_never_triton_even_under_the_interpreter(monkeypatch, interpreted):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpreted else "0")
    for m in (1, 8, 9, 64):
        assert select_kernel("auto", layer(), torch.zeros(m, 128)).name == "cpu_lut"  # the native CPU kernel


@pytest.mark.parametrize("name", TRITON_KERNELS)
def test_explicit_triton_on_cpu_without_interpreter_raises(no_interpreter, name):
    lin = QuantLinear(128, 16, planes=2, group_size=64, kernel=name)
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        lin(torch.zeros(1, 128))


@pytest.mark.parametrize("name", TRITON_KERNELS)
def test_explicit_triton_under_interpreter_is_selected(interpret, name):
    assert select_kernel(name, layer(), torch.zeros(2, 128)).name == name


@pytest.mark.parametrize("name", TRITON_KERNELS)
def test_reasons_name_the_problem_and_allowed_values(interpret, name):
    cases = [
        (layer(planes=5), torch.zeros(1, 128), r"5 planes .* allowed: \[1, 2, 3, 4\]"),
        (layer(group_size=16), torch.zeros(1, 128), r"group size 16 .* allowed: \[32, 64, 128, 256\]"),
        (layer(), torch.zeros(1, 128, dtype=torch.float64), "float64 is not supported"),
        (layer(), torch.zeros(1, 128, dtype=torch.bfloat16), "interpreter computes bfloat16 wrongly"),
        (layer(), torch.zeros(1, 128, device="meta"), "input is on meta"),
    ]
    for lin, x, pattern in cases:
        with pytest.raises(KernelUnavailableError, match=pattern):
            select_kernel(name, lin, x)


@pytest.mark.parametrize("name", TRITON_KERNELS)
def test_missing_triton_is_reported_and_auto_falls_back(fake_cuda, monkeypatch, name):
    monkeypatch.setattr(_triton, "triton_importable", lambda: False)
    with pytest.raises(KernelUnavailableError, match="triton is not installed"):
        select_kernel(name, layer(), torch.zeros(1, 128))
    assert select_kernel("auto", layer(), torch.zeros(1, 128)).name == "cpu_lut"  # the CPU tensors' next best


def test_kernels_are_built_for_the_mode_in_force_at_first_use(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = (triton_gemm._kernels(), triton_lut._kernels()["gemv"])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    compiled = (triton_gemm._kernels(), triton_lut._kernels()["gemv"])
    assert [type(k).__name__ for k in interpreted] == ["InterpretedFunction"] * 2
    assert [type(k).__name__ for k in compiled] == ["JITFunction"] * 2
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_gemm._kernels() is interpreted[0]


def test_importing_bpdq_and_running_on_cpu_never_imports_triton():
    code = (
        "import sys, torch, bpdq\n"
        "lin = bpdq.QuantLinear(64, 8, planes=2, group_size=32)\n"
        "lin(torch.zeros(1, 64)); lin(torch.zeros(16, 64))\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
