"""Kernels computing ``x @ W_hat^T`` from packed planes. ``bpdq.KERNELS`` lists them by name.

``torch`` (the reference, runs everywhere), ``triton_gemm`` (prefill) and ``triton_lut`` (decode, M <= 8).
The Triton modules import triton only when a kernel first runs, so importing bpdq never needs a GPU driver.
"""

from bpdq.kernels.base import Kernel, KernelUnavailableError, check_kernel_name, get_kernel, select_kernel
from bpdq.kernels.torch_ref import TorchKernel
from bpdq.kernels.triton_gemm import TritonGemmKernel
from bpdq.kernels.triton_lut import TritonLutKernel

__all__ = [
    "Kernel",
    "KernelUnavailableError",
    "TorchKernel",
    "TritonGemmKernel",
    "TritonLutKernel",
    "check_kernel_name",
    "get_kernel",
    "select_kernel",
]
