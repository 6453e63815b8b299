"""The Triton dequant-GEMM under TRITON_INTERPRET=1, against the fp64 reference."""

from __future__ import annotations

import pytest
import torch

from bpdq.kernels.triton_gemm import tile_config
from bpdq.linear import QuantLinear
from tests.kernels.reference import (
    assert_matches_reference,
    check_formats_match_reference,
    random_format_property,
    random_layer,
)

TOKENS = (1, 3, 8, 17, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_matches_reference(interpret, k, group_size, dtype):
    check_formats_match_reference("triton_gemm", k, group_size, dtype, TOKENS)


def test_ragged_rows_across_several_tiles(interpret):
    layer = random_layer(3, 64, 200, 128, bias=True, seed=1)  # 200 = 3 tiles of 64 + 8
    assert_matches_reference(layer, torch.randn(70, 128), "triton_gemm")  # 70 rows: 1 tile of 128


def test_quantized_linear_batches_and_zero_tokens(interpret):
    linear = torch.nn.Linear(128, 24)
    layer = QuantLinear.from_linear(linear, grid={"type": "bitplane", "planes": 2}, group_size=64, kernel="torch")
    x = torch.randn(2, 5, 128)
    expected = layer(x)
    layer.set_kernel("triton_gemm")
    got = layer(x)
    assert got.shape == (2, 5, 24)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert layer(torch.randn(0, 128)).shape == (0, 24)
    strided = torch.randn(128, 20).T  # [20, 128], not contiguous
    assert_matches_reference(layer, strided, "triton_gemm")


@pytest.mark.parametrize("m", [1, 16, 17, 100, 5000])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_tile_config_fits_dot_and_groups(m, group_size):
    cfg = tile_config(m, group_size)
    assert min(cfg["BM"], cfg["BN"], cfg["BK"]) >= 16  # tl.dot's minimum
    assert group_size % cfg["BK"] == 0  # a K step never straddles two groups
    for key in ("BM", "BN", "BK"):
        assert cfg[key] & (cfg[key] - 1) == 0, f"{key} must be a power of two"
    assert cfg["BM"] >= min(m, 128)


test_property_matches_reference_on_any_format = random_format_property("triton_gemm", max_tokens=70)
