"""bpdq/kernels/torch_ref.py: the plain-PyTorch reference kernel (dequantize, then a dense matmul)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bpdq.kernels import TorchKernel, get_kernel
from bpdq.linear import QuantLinear
from bpdq.quantized import QuantizedWeight

EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def layer_with(seed: int, *, k: int = 3, g: int = 32, out: int = 24, inp: int = 128, bias: bool = True) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**k, (out, inp), generator=gen)
    coeffs = torch.randn(out, inp // g, k + 1, generator=gen) * 0.05
    qw = QuantizedWeight.from_codes(codes, coeffs, planes=k, group_size=g)
    b = torch.randn(out, generator=gen) if bias else None
    return QuantLinear.from_quantized(qw, b, kernel="torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_fp64_reference_within_dtype_roundoff(dtype, bias):
    layer = layer_with(0, bias=bias)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = get_kernel("torch").forward(layer, x)
    assert y.dtype == dtype and y.shape == (5, 24)
    w = layer.quantized_weight().dequantize(torch.float64)
    b = layer.bias.double() if bias else torch.zeros(24, dtype=torch.float64)
    ref = x.double() @ w.T + b
    # rounding W_hat and the output to `dtype` plus accumulation: a few eps of sum |x||w| + |b|
    bound = 4 * EPS[dtype] * (x.double().abs() @ w.abs().T + b.abs())
    assert torch.all((y.double() - ref).abs() <= bound)


def test_forward_is_exactly_f_linear_of_the_dequantized_weight():
    layer = layer_with(2)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3), dtype=torch.float16)
    expected = F.linear(x, layer.quantized_weight().dequantize(torch.float16), layer.bias.half())
    assert torch.equal(TorchKernel().forward(layer, x), expected)


def test_supports_everything_and_has_the_lowest_builtin_priority():
    layer = layer_with(4)
    assert TorchKernel().supports(layer, torch.zeros(1, 128)) is None
    assert TorchKernel.priority == 0 and TorchKernel.name == "torch"
    assert TorchKernel().prepare(layer) is None  # canonical layout, nothing to repack


def test_empty_batch():
    layer = layer_with(5)
    assert TorchKernel().forward(layer, torch.zeros(0, 128)).shape == (0, 24)
