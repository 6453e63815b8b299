"""Kernels computing ``x @ W_hat^T`` from packed planes. ``bpdq.KERNELS`` lists them by name.

``torch`` (the reference, runs everywhere), ``cpu_lut`` (native C for CPUs: lookup tables for decode, tiled
dequantize + matmul for prefill), ``triton_gemm`` (prefill) and ``triton_lut`` (decode, M <= 8).
The Triton modules import triton only when a kernel first runs, so importing bpdq never needs a GPU driver.
"""

from bpdq.kernels.base import (
    Kernel,
    KernelUnavailableError,
    PackedLinear,
    check_kernel_name,
    get_kernel,
    select_kernel,
)
from bpdq.kernels.cpu_lut import CpuLutKernel
from bpdq.kernels.torch_ref import TorchKernel
from bpdq.kernels.triton_gemm import TritonGemmKernel
from bpdq.kernels.triton_lut import TritonLutKernel

__all__ = [
    "CpuLutKernel",
    "Kernel",
    "KernelUnavailableError",
    "PackedLinear",
    "TorchKernel",
    "TritonGemmKernel",
    "TritonLutKernel",
    "check_kernel_name",
    "get_kernel",
    "select_kernel",
]
