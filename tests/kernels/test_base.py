"""bpdq/kernels/base.py: kernel lookup, the kernel-name check, dispatch (explicit and auto) and caching."""

from __future__ import annotations

import pytest
import torch

from bpdq import KERNELS, KernelUnavailableError, UnknownNameError
from bpdq.kernels import Kernel, TorchKernel, check_kernel_name, get_kernel, select_kernel
from bpdq.linear import QuantLinear


def make_kernel(priority: int, reason: str | None = None, excluded: str | None = None) -> type[Kernel]:
    class Fake(Kernel):
        prepared = 0

        def supports(self, layer, x):
            return reason

        def auto_excluded(self, layer, x):
            return excluded

        def prepare(self, layer):
            type(self).prepared += 1
            return {"repacked": layer.planes.clone()}

        def forward(self, layer, x):
            return torch.full((x.shape[0], layer.out_features), 7.0, dtype=x.dtype)

    Fake.priority = priority
    return Fake


@pytest.fixture
def layer() -> QuantLinear:
    return QuantLinear(64, 8, planes=2, group_size=32)


X = torch.zeros(2, 64)


def test_get_kernel_returns_a_cached_instance_per_name():
    assert isinstance(get_kernel("torch"), TorchKernel)
    assert get_kernel("torch") is get_kernel("torch")
    with pytest.raises(UnknownNameError, match="unknown kernel 'nope'; known kernels: .*'torch'"):
        get_kernel("nope")


def test_reregistering_a_name_gives_a_fresh_instance(register):
    first = register(KERNELS, "test-kernel", make_kernel(-1))
    inst = get_kernel("test-kernel")
    assert type(inst) is first
    KERNELS.unregister("test-kernel")
    second = register(KERNELS, "test-kernel", make_kernel(-1))
    assert type(get_kernel("test-kernel")) is second


def test_check_kernel_name():
    assert check_kernel_name("auto") == "auto"
    assert check_kernel_name("torch") == "torch"
    with pytest.raises(ValueError, match="unknown kernel 'cuda'; known kernels: .*'torch'"):
        check_kernel_name("cuda")
    with pytest.raises(TypeError, match=r"kernel must be a string \('auto' or one of .*'torch'.*got int"):
        check_kernel_name(1)


def test_auto_on_cpu_selects_the_native_kernel_else_torch(layer, monkeypatch):
    assert select_kernel("auto", layer, X).name == "cpu_lut"  # the library is built for the tests
    assert select_kernel("auto", layer, X.half()).name == "torch"  # a dtype the native kernel declines


def test_auto_prefers_the_highest_priority_kernel_that_supports_the_call(layer, register):
    register(KERNELS, "test-high-unsupported", make_kernel(1000, reason="needs a GPU"))
    register(KERNELS, "test-high-excluded", make_kernel(900, excluded="only under the interpreter"))
    register(KERNELS, "test-mid", make_kernel(500))
    register(KERNELS, "test-low", make_kernel(-5))
    assert select_kernel("auto", layer, X).name == "test-mid"
    # an explicit choice ignores auto's exclusion but not an unsupported call
    assert select_kernel("test-high-excluded", layer, X).name == "test-high-excluded"
    pattern = "kernel 'test-high-unsupported' cannot run this layer: needs a GPU"
    with pytest.raises(KernelUnavailableError, match=pattern):
        select_kernel("test-high-unsupported", layer, X)


def test_auto_without_any_runnable_kernel_lists_every_reason(layer, monkeypatch):
    for name in KERNELS.names():
        monkeypatch.setattr(KERNELS.get(name), "supports", lambda self, layer, x, n=name: f"{n} says no")
    with pytest.raises(KernelUnavailableError, match="no registered kernel supports this call: .*torch: torch says no"):
        select_kernel("auto", layer, X)


def test_packed_prepares_once_per_layer_and_moving_the_layer_clears_it(layer, register):
    cls = register(KERNELS, "test-packing", make_kernel(-1))
    kernel = get_kernel("test-packing")
    first = kernel.packed(layer)
    assert kernel.packed(layer) is first and cls.prepared == 1
    assert torch.equal(first["repacked"], layer.planes)
    other = QuantLinear(64, 8, planes=2, group_size=32)
    kernel.packed(other)
    assert cls.prepared == 2
    layer.to("cpu")
    kernel.packed(layer)
    assert cls.prepared == 3
