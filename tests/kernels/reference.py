"""Helpers for kernel tests: random layers in the canonical format and a precision-aware comparison.

A kernel's result is compared with an fp64 reference ``x.double() @ W_hat.double().T + bias``; its error
must stay within a small multiple of the torch kernel's error at the same activation dtype, plus a floor
of a few units of roundoff of that dtype at the size of the largest sum of absolute terms ``|x| @ |W_hat|^T
+ |bias|`` (the scale of a dot product's rounding error; an output that cancels to nearly zero does not
shrink it). A kernel with a known extra error (the int8 tables of ``cpu_lut``'s AVX2 path) passes its
analytic per-output bound as ``extra``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bpdq.linear import QuantLinear
from bpdq.quantized import QuantizedWeight
from tests.strategies import codes_and_coeffs, seeds

#: The kernel may be this many times less accurate than the torch kernel (different summation orders).
ERROR_FACTOR = 4.0
#: Floor, in units of the dtype's epsilon times the largest sum of absolute terms of an output.
FLOOR_EPS = 4.0


def random_layer(k: int, group_size: int, out_features: int, in_features: int, *, bias: bool, seed: int) -> QuantLinear:
    """A QuantLinear with random planes, coefficients of mixed signs and scales, and optionally a bias."""
    gen = torch.Generator().manual_seed(seed)
    layer = QuantLinear(in_features, out_features, planes=k, group_size=group_size, bias=bias)
    layer.planes.copy_(torch.randint(0, 256, layer.planes.shape, dtype=torch.uint8, generator=gen))
    groups = in_features // group_size
    scale = torch.rand(groups, 1, out_features, generator=gen) * 0.1 + 0.01
    jitter = 1 + 0.3 * torch.randn(groups, k, out_features, generator=gen)
    plane_coeffs = scale * (2.0 ** torch.arange(k).view(1, k, 1)) * jitter
    offset = torch.randn(groups, 1, out_features, generator=gen) * scale * 2**k
    layer.coeffs.copy_(torch.cat([plane_coeffs, offset], dim=1).half())
    if bias:
        layer.bias.data.copy_(torch.randn(out_features, generator=gen))
    return layer


def reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """fp64 ``x @ W_hat^T + bias``."""
    w = layer.quantized_weight().dequantize(torch.float64)
    y = x.double() @ w.T
    return y + layer.bias.double() if layer.bias is not None else y


def assert_matches_reference(layer: QuantLinear, x: torch.Tensor, kernel: str, extra: torch.Tensor | None = None) -> None:
    """Run ``layer`` with ``kernel`` and with the torch kernel; bound the kernel's error by the torch one's,
    plus, per output, ``extra * (1 + eps)`` (the kernel's own error bound before rounding to ``x.dtype``)."""
    ref = reference(layer, x)
    layer.set_kernel("torch")
    torch_err = (layer(x).double() - ref).abs().max().item() if x.shape[0] else 0.0
    layer.set_kernel(kernel)
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == ref.shape
    if not x.shape[0]:
        return
    err = (y.double() - ref).abs()
    w = layer.quantized_weight().dequantize(torch.float64)
    terms = x.double().abs() @ w.abs().T + (layer.bias.double().abs() if layer.bias is not None else 0.0)
    bound = ERROR_FACTOR * torch_err + FLOOR_EPS * torch.finfo(x.dtype).eps * terms.max().item()
    if extra is None:
        assert err.max() <= bound, f"{kernel}: max error {err.max():.3g} > bound {bound:.3g} (torch kernel: {torch_err:.3g})"
        return
    excess = err - bound - extra * (1 + torch.finfo(x.dtype).eps)
    worst = int(excess.argmax())
    assert excess.max() <= 0, (
        f"{kernel}: error {err.flatten()[worst]:.3g} > bound {bound:.3g} + {extra.flatten()[worst]:.3g} at output "
        f"{divmod(worst, err.shape[1])} (torch kernel: {torch_err:.3g})"
    )


def random_format_layer(
    case: tuple, tokens: int, dtype: torch.dtype, bias: bool, seed: int
) -> tuple[QuantLinear, torch.Tensor]:
    """A layer of a random format from ``tests.strategies.codes_and_coeffs`` and ``tokens`` random inputs."""
    codes, coeffs, k, g = case
    qweight = QuantizedWeight.from_codes(codes, coeffs, planes=k, group_size=g)
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features = qweight.shape
    layer = QuantLinear.from_quantized(qweight, torch.randn(out_features, generator=gen) if bias else None)
    return layer, torch.randn(tokens, in_features, generator=gen).to(dtype)


def check_random_format(case: tuple, tokens: int, dtype: torch.dtype, bias: bool, seed: int, kernel: str) -> None:
    """Property body shared by the Triton kernels: a random format from ``tests.strategies.codes_and_coeffs``."""
    layer, x = random_format_layer(case, tokens, dtype, bias, seed)
    assume(reference(layer, x).abs().max() < 0.1 * torch.finfo(dtype).max)  # fp16 outputs stay finite
    with pytest.MonkeyPatch.context() as mp:  # hypothesis runs examples outside function-scoped fixtures
        mp.setenv("TRITON_INTERPRET", "1")
        assert_matches_reference(layer, x, kernel)


def random_format_property(kernel: str, max_tokens: int):
    """The Triton kernels' property test: any format, ``1..max_tokens`` tokens, fp32 or fp16, with or without
    a bias, matches the reference (assign it to a ``test_*`` name in the kernel's test file)."""

    @settings(max_examples=10)
    @given(
        case=codes_and_coeffs(max_out=40),
        tokens=st.integers(min_value=1, max_value=max_tokens),
        dtype=st.sampled_from([torch.float32, torch.float16]),
        bias=st.booleans(),
        seed=seeds,
    )
    def test(case, tokens, dtype, bias, seed):
        check_random_format(case, tokens, dtype, bias, seed, kernel)

    return test


def check_formats_match_reference(
    kernel: str, k: int, group_size: int, dtype: torch.dtype, tokens: tuple[int, ...]
) -> None:
    """A 40-row random layer of at least two groups (bias at odd ``k``) matches the reference at each token count."""
    in_features = max(256, 2 * group_size)
    layer = random_layer(k, group_size, 40, in_features, bias=k % 2 == 1, seed=10 * k + group_size)
    gen = torch.Generator().manual_seed(k)
    for m in tokens:
        assert_matches_reference(layer, torch.randn(m, in_features, generator=gen).to(dtype), kernel)
