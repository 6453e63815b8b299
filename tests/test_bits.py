"""bpdq/bits.py: plane matrix, code <-> bit conversion, packing (all lossless, checked with torch.equal)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bpdq.bits import bits_to_codes, codes_to_bits, pack_bits, plane_matrix, unpack_bits
from tests.strategies import any_bits, seeds


@pytest.mark.parametrize("k", range(1, 9))
def test_plane_matrix_rows_are_bits_of_the_code_then_one(k):
    m = plane_matrix(k)
    assert m.shape == (2**k, k + 1)
    for q in range(2**k):
        expected = [float((q >> i) & 1) for i in range(k)] + [1.0]
        assert m[q].tolist() == expected


def test_plane_matrix_times_uniform_coeffs_lists_evenly_spaced_levels():
    s, c0 = 0.5, -1.25
    coeffs = torch.tensor([s * 2**i for i in range(3)] + [c0])
    assert torch.equal(plane_matrix(3) @ coeffs, c0 + s * torch.arange(8.0))


def test_plane_matrix_dtype_and_device():
    m = plane_matrix(2, dtype=torch.float64, device="cpu")
    assert m.dtype == torch.float64 and m.device.type == "cpu"


@given(k=any_bits, seed=seeds, shape=st.lists(st.integers(1, 5), min_size=1, max_size=3))
def test_codes_bits_round_trip(k, seed, shape):
    codes = torch.randint(0, 2**k, shape, generator=torch.Generator().manual_seed(seed))
    bits = codes_to_bits(codes, k)
    assert bits.dtype == torch.uint8 and bits.shape == (k, *shape)
    assert set(bits.unique().tolist()) <= {0, 1}
    assert torch.equal(bits_to_codes(bits), codes)


def test_plane_zero_is_the_least_significant_bit():
    bits = codes_to_bits(torch.tensor([1, 2, 3, 6]), 3)
    assert bits.tolist() == [[1, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 1]]


@given(seed=seeds, lead=st.lists(st.integers(1, 4), max_size=2), n_bytes=st.integers(1, 6))
def test_pack_unpack_round_trip(seed, lead, n_bytes):
    bits = torch.randint(0, 2, (*lead, 8 * n_bytes), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, n_bytes)
    assert torch.equal(unpack_bits(packed), bits)


def test_pack_bit_j_of_byte_b_is_column_8b_plus_j():
    bits = torch.zeros(16, dtype=torch.uint8)
    bits[[0, 3, 7, 9]] = 1  # byte 0: bits 0, 3, 7; byte 1: bit 1
    assert pack_bits(bits).tolist() == [1 + 8 + 128, 2]


def test_pack_accepts_bool_and_int_bits():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1])
    assert pack_bits(bits).tolist() == [129]
    assert pack_bits(bits.bool()).tolist() == [129]


def test_pack_rejects_length_not_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8, got 12"):
        pack_bits(torch.zeros(12, dtype=torch.uint8))


def test_unpack_rejects_non_uint8():
    with pytest.raises(TypeError, match="expected uint8, got torch.int32"):
        unpack_bits(torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize("k", [0, 9])
def test_codes_to_bits_refuses_plane_counts_outside_1_to_8(k):
    with pytest.raises(ValueError, match="k must be in 1..8"):
        codes_to_bits(torch.tensor([0, 1]), k)
