"""The Triton lookup-table GEMV under TRITON_INTERPRET=1, against the fp64 reference."""

from __future__ import annotations

import pytest
import torch

from bpdq.kernels import KernelUnavailableError
from bpdq.kernels.layout import is_column_major
from bpdq.kernels.triton_lut import MAX_TOKENS, split_count
from tests.kernels.reference import (
    assert_matches_reference,
    check_formats_match_reference,
    random_format_property,
    random_layer,
)

TOKENS = (1, 3, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_matches_reference(interpret, k, group_size, dtype):
    check_formats_match_reference("triton_lut", k, group_size, dtype, TOKENS)


@pytest.mark.parametrize("bias", [False, True])
def test_single_and_split_reduction(interpret, bias):
    # 40 rows: one row block -> the groups are split over programs; 1100 rows: two blocks, no split.
    assert split_count(1, 8, torch.device("cpu")) > 1
    assert split_count(2, 8, torch.device("cpu")) == 1
    for out_features in (40, 1100):
        layer = random_layer(2, 32, out_features, 256, bias=bias, seed=out_features)
        assert_matches_reference(layer, torch.randn(2, 256), "triton_lut")


def test_strided_input_and_zero_tokens(interpret):
    layer = random_layer(3, 32, 24, 128, bias=True, seed=3)
    x = torch.randn(128, 5).T  # [5, 128], not contiguous
    assert not x.is_contiguous()
    assert_matches_reference(layer, x, "triton_lut")
    assert layer(torch.randn(0, 128)).shape == (0, 24)


def test_planes_are_relaid_out_in_place_once(interpret):
    layer = random_layer(2, 64, 16, 128, bias=False, seed=0)
    canonical = layer.planes.clone()
    layer.set_kernel("triton_lut")
    x = torch.randn(1, 128)
    y = layer(x)
    relaid = layer.planes
    assert is_column_major(relaid) and torch.equal(relaid, canonical)  # same values, other strides
    assert layer._kernel_cache == {}  # no second copy kept beside the buffer
    layer(x)
    assert layer.planes is relaid
    layer.set_kernel("triton_gemm")  # the GEMM kernel reads the relaid planes through their strides
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_more_than_eight_tokens_is_refused(interpret):
    layer = random_layer(2, 64, 16, 128, bias=False, seed=0)
    layer.set_kernel("triton_lut")
    with pytest.raises(KernelUnavailableError, match=f"at most {MAX_TOKENS} tokens"):
        layer(torch.randn(MAX_TOKENS + 1, 128))


test_property_matches_reference_on_any_format = random_format_property("triton_lut", max_tokens=8)
