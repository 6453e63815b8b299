"""Kernels computing ``x @ W_hat^T`` from packed planes. ``bpdq.KERNELS`` lists them by name.

Triton kernels are imported lazily by their own modules, so importing bpdq never needs a GPU driver.
"""

from bpdq.kernels.base import Kernel, KernelUnavailableError, check_kernel_name, get_kernel, select_kernel
from bpdq.kernels.torch_ref import TorchKernel

__all__ = ["Kernel", "KernelUnavailableError", "TorchKernel", "check_kernel_name", "get_kernel", "select_kernel"]
