"""bpdq/linear.py: QuantLinear forward, construction, state_dict round trip, kernels and repr."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bpdq
from bpdq import KERNELS, QuantLinear
from bpdq.kernels import Kernel
from bpdq.quantized import QuantizedWeight

EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def quantized_linear(seed: int = 0, *, bias: bool = True, kernel: str = "auto") -> tuple[QuantLinear, nn.Linear]:
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(128, 16, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(16, 128, generator=gen) * 0.1)
        if bias:
            linear.bias.copy_(torch.randn(16, generator=gen))
    layer = QuantLinear.from_linear(linear, grid={"type": "bitplane", "planes": 2}, group_size=64, kernel=kernel)
    return layer, linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)], ids=["1d", "2d", "3d"])
def test_forward_equals_x_times_dequantized_weight_plus_bias(dtype, lead):
    layer, _ = quantized_linear()
    x = torch.randn(*lead, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = layer(x)
    assert y.shape == (*lead, 16) and y.dtype == dtype
    w = layer.quantized_weight().dequantize(torch.float64)
    ref = x.double() @ w.T + layer.bias.double()
    bound = 4 * EPS[dtype] * (x.double().abs() @ w.abs().T + layer.bias.double().abs())
    assert torch.all((y.double() - ref).abs() <= bound)


def test_forward_without_bias():
    layer, _ = quantized_linear(bias=False)
    x = torch.randn(4, 128)
    torch.testing.assert_close(layer(x), x @ layer.quantized_weight().dequantize().T)


def test_from_linear_matches_quantize_weight_and_approximates_the_original():
    layer, linear = quantized_linear(2)
    qw = bpdq.quantize_weight(linear.weight, grid={"type": "bitplane", "planes": 2}, group_size=64)
    assert torch.equal(layer.planes, qw.planes) and torch.equal(layer.coeffs, qw.coeffs)
    assert torch.equal(layer.bias, linear.bias)
    rel = (qw.dequantize() - linear.weight).norm() / linear.weight.norm()
    assert rel < 0.35  # 2-bit grid on Gaussian weights


def test_state_dict_round_trip_is_exact():
    layer, _ = quantized_linear(3)
    sd = layer.state_dict()
    assert set(sd) == {"planes", "coeffs", "bias"}
    fresh = QuantLinear(128, 16, planes=2, group_size=64, bias=True)
    fresh.load_state_dict(sd)
    for name in sd:
        assert torch.equal(fresh.state_dict()[name], sd[name])
    x = torch.randn(2, 128)
    assert torch.equal(fresh(x), layer(x))


def test_load_state_dict_with_a_different_layout_fails():
    layer, _ = quantized_linear(4)
    other = QuantLinear(128, 16, planes=3, group_size=64, bias=True)
    with pytest.raises(RuntimeError, match="size mismatch for planes"):
        other.load_state_dict(layer.state_dict())


def test_quantized_weight_round_trip_through_from_quantized():
    layer, _ = quantized_linear(5)
    qw = layer.quantized_weight()
    assert isinstance(qw, QuantizedWeight) and qw.shape == (16, 128) and qw.k == 2
    again = QuantLinear.from_quantized(qw, layer.bias)
    assert torch.equal(again.planes, layer.planes) and torch.equal(again.coeffs, layer.coeffs)


def test_moving_and_casting_keep_the_packed_dtypes():
    layer, _ = quantized_linear(6)
    planes, coeffs = layer.planes.clone(), layer.coeffs.clone()
    layer.to(torch.bfloat16)
    assert layer.planes.dtype == torch.uint8 and layer.coeffs.dtype == torch.float16
    assert torch.equal(layer.planes, planes) and torch.equal(layer.coeffs, coeffs)
    assert layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(2, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_extra_repr_is_readable():
    layer, _ = quantized_linear()
    assert layer.extra_repr() == (
        "in_features=128, out_features=16, bias=True, planes=2, group_size=64, bpw=2.750, kernel=auto"
    )
    assert repr(layer).startswith("QuantLinear(in_features=128")
    assert layer.bits_per_weight == 2.75


def test_unknown_kernel_raises_listing_known_kernels():
    with pytest.raises(ValueError, match="unknown kernel 'cuda'; known kernels: .*'torch'"):
        QuantLinear(64, 8, planes=2, group_size=32, kernel="cuda")
    layer, _ = quantized_linear()
    with pytest.raises(ValueError, match="unknown kernel 'fast'; known kernels: .*'torch'"):
        layer.set_kernel("fast")
    assert layer.kernel == "auto"


class Doubling(Kernel):
    """Test kernel: twice the reference result, so that its use is visible in the output."""

    calls = 0

    def forward(self, layer, x):
        type(self).calls += 1
        return 2 * torch.nn.functional.linear(x, layer.quantized_weight().dequantize(x.dtype), layer.bias)


def test_registered_kernel_is_used_by_name_and_by_auto_when_its_priority_is_higher(register):
    layer, _ = quantized_linear(7)
    x = torch.randn(3, 128)
    layer.set_kernel("torch")
    reference = layer(x)
    layer.set_kernel("auto")
    Doubling.calls, Doubling.priority = 0, -1
    register(KERNELS, "test-doubling", Doubling)
    layer(x)
    assert layer.kernel_for(x).name != "test-doubling" and Doubling.calls == 0  # lowest priority: not auto's pick
    layer.set_kernel("test-doubling")
    assert torch.equal(layer(x), 2 * reference) and Doubling.calls == 1
    layer.set_kernel("auto")
    KERNELS.unregister("test-doubling")
    Doubling.priority = 1000
    register(KERNELS, "test-doubling", Doubling)  # a registry change: the layer chooses again
    assert torch.equal(layer(x), 2 * reference) and Doubling.calls == 2


def test_constructor_validation():
    with pytest.raises(ValueError, match="planes must be in 1..8, got 9"):
        QuantLinear(64, 8, planes=9, group_size=32)
    with pytest.raises(ValueError, match="planes must be in 1..8, got 0"):
        QuantLinear(64, 8, planes=0, group_size=32)
    with pytest.raises(ValueError, match="in_features 64 is not divisible by group_size 48"):
        QuantLinear(64, 8, planes=2, group_size=48)


def test_wrong_input_width_names_in_features():
    layer, _ = quantized_linear()
    with pytest.raises(ValueError, match=r"input's last dimension must be in_features=128, got \(2, 64\)"):
        layer(torch.randn(2, 64))


def test_from_quantized_and_from_linear_argument_checks():
    layer, _ = quantized_linear()
    with pytest.raises(TypeError, match="qweight must be a QuantizedWeight, got Tensor"):
        QuantLinear.from_quantized(torch.zeros(2))
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\), got \(8,\)"):
        QuantLinear.from_quantized(layer.quantized_weight(), torch.zeros(8))
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got Conv1d"):
        QuantLinear.from_linear(nn.Conv1d(2, 2, 1), grid="uniform", group_size=32)


class Repacking(Kernel):
    """Test kernel computing from its own cached copy of the weight (like a kernel that repacks)."""

    priority = -1

    def prepare(self, layer):
        return layer.quantized_weight().dequantize(torch.float32)

    def forward(self, layer, x):
        return torch.nn.functional.linear(x, self.packed(layer).to(x.dtype), layer.bias)


def test_load_state_dict_invalidates_kernel_repacks(register):
    register(KERNELS, "test-repacking", Repacking)
    layer, _ = quantized_linear(8, kernel="test-repacking")
    other, _ = quantized_linear(9)
    x = torch.randn(2, 128)
    layer(x)  # fills the cache from the old weights
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer(x), other(x))


def test_kernel_choice_is_cached_per_signature_and_dropped_on_changes(register):
    from bpdq import KERNELS
    from bpdq.kernels import Kernel

    calls = []

    class Counting(Kernel):
        priority = 1000

        def supports(self, layer, x):
            calls.append(x.shape[0])
            return None

        def forward(self, layer, x):
            return torch.zeros(x.shape[0], layer.out_features, dtype=x.dtype)

    layer = QuantLinear(64, 8, planes=2, group_size=32)
    register(KERNELS, "test-counting", Counting)
    layer(torch.randn(3, 64))
    layer(torch.randn(3, 64))
    assert calls == [3] and layer.kernel_for(torch.randn(3, 64)).name == "test-counting"
    layer(torch.randn(5, 64))
    assert calls == [3, 5]
    layer.to("cpu")  # moving forgets the choices
    layer(torch.randn(3, 64))
    assert calls == [3, 5, 3]
    KERNELS.unregister("test-counting")  # so does a registry change
    assert layer.kernel_for(torch.randn(3, 64)).name != "test-counting"


def test_meta_layer_to_empty_and_single_copy_moves():
    meta = QuantLinear(64, 8, planes=2, group_size=32, bias=True, device="meta")
    layer = meta.to_empty(device="cpu")
    assert layer.planes.device.type == "cpu" and layer.planes.dtype == torch.uint8
    assert layer.coeffs.dtype == torch.float16 and layer.coeffs.shape == (2, 3, 8)
    layer.coeffs.copy_(torch.randn(2, 3, 8).half())
    coeffs = layer.coeffs.clone()
    layer.to(torch.bfloat16)  # only the bias follows a float cast; the coefficients keep their exact values
    assert layer.bias.dtype == torch.bfloat16 and torch.equal(layer.coeffs, coeffs)
    planes = layer.planes
    layer.to("cpu")  # no copy when nothing changes
    assert layer.planes is planes


def test_layer_keeps_what_its_quantized_weight_knew():
    w = torch.randn(8, 64)
    qw = bpdq.quantize_weight(w, None, grid={"type": "bitplane", "planes": 2}, solver="rtn", group_size=32)
    qw.dtype = torch.bfloat16
    layer = QuantLinear.from_quantized(qw)
    back = layer.quantized_weight()
    assert back.dtype == torch.bfloat16 and back.grid == qw.grid and back.solver == qw.solver and qw.grid
    assert layer.grid == qw.grid and layer.weight_dtype == torch.bfloat16
