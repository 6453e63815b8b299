"""bpdq/safetensors_header.py: the header is read and checked by hand, agreeing with safetensors itself."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bpdq.safetensors_header import read_header, read_tensors


@pytest.fixture
def good(tmp_path):
    tensors = {"a": torch.zeros(3, 4, dtype=torch.bfloat16), "b": torch.zeros(5, dtype=torch.uint8), "c": torch.zeros(0)}
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    return tmp_path / "w.safetensors", tensors


def test_header_lists_names_shapes_and_dtypes(good):
    path, tensors = good
    found = read_header(path)
    assert sorted(found) == sorted(tensors)
    for name, t in tensors.items():
        assert found[name].device.type == "meta" and found[name].shape == t.shape and found[name].dtype == t.dtype


def test_read_tensors_equals_safetensors_for_every_dtype(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"t_{dtype}".replace("torch.", ""): (torch.randn(3, 5, generator=gen) * 100).to(dtype)
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
                      torch.float8_e5m2, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
    }
    tensors |= {"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 7), "big": torch.randn(1 << 18, generator=gen)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    expected = load_file(str(path))
    names = ["big", "t_bfloat16", "scalar", "empty", *[n for n in tensors if n.startswith("t_")]]
    found = read_tensors(path, names)
    assert list(found) == list(dict.fromkeys(names))
    for name in names:
        assert found[name].dtype == expected[name].dtype and found[name].shape == expected[name].shape
        assert torch.equal(found[name].reshape(-1).view(torch.uint8), expected[name].reshape(-1).view(torch.uint8)), name
    with pytest.raises(ValueError, match="holds no tensor 'nope'"):
        read_tensors(path, ["nope"])


def test_read_tensors_checks_the_file_first(tmp_path):
    path = tmp_path / "bad.safetensors"
    _with_header(path, {"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(ValueError, match="truncated.*ends at data byte 16"):
        read_tensors(path, ["t"])


def _with_header(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated.*ends at data byte 16"),
        ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 12, "needs 16 bytes"),
        ({"t": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 2]}}, b"\0" * 2, "unsupported dtype 'Q4'"),
        ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "invalid shape"),
        ({"t": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "lacks dtype, shape or data_offsets"),
        ([1, 2], b"", "not a JSON object"),
    ],
)
def test_bad_headers_are_named(tmp_path, header, data, message):
    path = tmp_path / "x.safetensors"
    _with_header(path, header, data)
    with pytest.raises(ValueError, match=f"x.safetensors is not a valid safetensors file.*{message}"):
        read_header(path)


def test_header_length_beyond_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes((1000).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header length field says 1000 bytes, the file has 10 bytes"):
        read_header(path)
