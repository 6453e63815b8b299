"""bpdq/quantized.py: the canonical packed layout, its dequantization, bpw and lossless serialisation."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from safetensors import safe_open
from safetensors.torch import save_file

from bpdq.quantized import DTYPE_NAMES, QuantizedWeight, SolveStats, dequantize_packed, dtype_from_name, dtype_name
from tests.strategies import codes_and_coeffs


def build(codes, coeffs, k, g, **kw) -> QuantizedWeight:
    return QuantizedWeight.from_codes(codes, coeffs, planes=k, group_size=g, **kw)


@given(data=codes_and_coeffs())
def test_from_codes_layout_and_lossless_codes(data):
    codes, coeffs, k, g = data
    qw = build(codes, coeffs, k, g)
    out, inp = codes.shape
    assert qw.planes.shape == (k, out, inp // 8) and qw.planes.dtype == torch.uint8
    assert qw.coeffs.shape == (inp // g, k + 1, out) and qw.coeffs.dtype == torch.float16
    assert (qw.k, qw.out_features, qw.in_features, qw.n_groups) == (k, out, inp, inp // g)
    assert torch.equal(qw.codes(), codes)
    assert torch.equal(qw.bits(), torch.stack([(codes >> i) & 1 for i in range(k)]).to(torch.uint8))
    assert torch.equal(qw.coeffs, coeffs.permute(1, 2, 0).half())  # coeffs[group, i, row]


@given(data=codes_and_coeffs())
def test_dequantize_follows_the_format_formula(data):
    codes, coeffs, k, g = data
    qw = build(codes, coeffs, k, g)
    c = coeffs.half().float()  # [out, groups, k+1], stored precision
    out, inp = codes.shape
    group = torch.arange(inp) // g
    expected = c[:, group, k].clone()  # offset c_0
    for i in range(k):
        expected += c[:, group, i] * ((codes >> i) & 1).float()
    assert torch.equal(qw.dequantize(), expected)  # same summation order: bit-exact
    assert torch.equal(dequantize_packed(qw.planes, qw.coeffs, g), expected)


def test_dequantize_casts_to_the_original_or_requested_dtype():
    codes = torch.randint(0, 4, (2, 32))
    qw = build(codes, torch.randn(2, 1, 3), 2, 32, dtype=torch.bfloat16)
    assert qw.dequantize().dtype == torch.bfloat16
    assert qw.dequantize(torch.float64).dtype == torch.float64
    assert torch.equal(qw.dequantize(torch.float64), dequantize_packed(qw.planes, qw.coeffs, 32).double())


@pytest.mark.parametrize(("k", "g", "bpw"), [(2, 64, 2.75), (2, 128, 2.375), (3, 128, 3.5), (4, 32, 6.5)])
def test_bits_per_weight_formula(k, g, bpw):
    qw = build(torch.zeros(4, 2 * g, dtype=torch.int64), torch.zeros(4, 2, k + 1), k, g)
    assert qw.bits_per_weight == bpw == k + 16 * (k + 1) / g
    assert qw.nbytes * 8 == bpw * qw.out_features * qw.in_features  # the formula is the real storage


def _assert_same(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert torch.equal(a.planes, b.planes) and torch.equal(a.coeffs, b.coeffs)
    assert (a.group_size, a.shape, a.dtype, a.grid, a.solver) == (b.group_size, b.shape, b.dtype, b.grid, b.solver)
    assert torch.equal(a.dequantize(), b.dequantize())


@given(data=codes_and_coeffs())
def test_to_tensors_from_tensors_is_lossless(data):
    codes, coeffs, k, g = data
    qw = build(codes, coeffs, k, g, dtype=torch.float16, grid={"type": "bitplane", "planes": k}, solver={"type": "rtn"})
    tensors, meta = qw.to_tensors()
    assert set(tensors) == {"planes", "coeffs"}
    assert json.loads(meta)["planes"] == k
    _assert_same(qw, QuantizedWeight.from_tensors(tensors, meta))
    _assert_same(qw, QuantizedWeight.from_tensors(tensors, json.loads(meta)))


def test_safetensors_round_trip_is_lossless(tmp_path):
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8, (5, 128), generator=gen)
    qw = build(codes, torch.randn(5, 2, 4, generator=gen), 3, 64, dtype=torch.bfloat16,
               grid={"type": "bitplane", "planes": 3, "init_bits": 8}, solver={"type": "rtn", "refits": 2})
    tensors, meta = qw.to_tensors()
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"bpdq": meta})
    with safe_open(str(path), framework="pt") as f:
        loaded = {name: f.get_tensor(name) for name in f.keys()}
        loaded_meta = f.metadata()["bpdq"]
    _assert_same(qw, QuantizedWeight.from_tensors(loaded, loaded_meta))


def test_from_tensors_errors():
    qw = build(torch.zeros(2, 32, dtype=torch.int64), torch.zeros(2, 1, 3), 2, 32)
    tensors, meta = qw.to_tensors()
    with pytest.raises(ValueError, match=r"missing tensors \['coeffs'\]"):
        QuantizedWeight.from_tensors({"planes": tensors["planes"]}, meta)
    bad = dict(json.loads(meta), planes=3)
    with pytest.raises(ValueError, match="planes tensor has 2 planes but metadata says 3"):
        QuantizedWeight.from_tensors(tensors, bad)
    with pytest.raises(ValueError, match=r"unsupported dtype 'int8'; allowed: \['bfloat16', 'float16'"):
        QuantizedWeight.from_tensors(tensors, dict(json.loads(meta), dtype="int8"))


def test_dtype_names_round_trip():
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert dtype_from_name(dtype_name(dt)) is dt


def test_from_codes_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\) for 2 planes"):
        build(torch.full((1, 32), 4), torch.zeros(1, 1, 3), 2, 32)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\)"):
        build(torch.full((1, 32), -1), torch.zeros(1, 1, 3), 2, 32)


def test_constructor_validates_the_layout():
    planes = torch.zeros(2, 3, 8, dtype=torch.uint8)
    coeffs = torch.zeros(2, 3, 3, dtype=torch.float16)
    QuantizedWeight(planes, coeffs, group_size=32, shape=(3, 64))  # valid
    with pytest.raises(ValueError, match=r"planes must be uint8\[k, out, in/8\]"):
        QuantizedWeight(planes.int(), coeffs, group_size=32, shape=(3, 64))
    with pytest.raises(ValueError, match="number of planes must be in 1..8, got 9"):
        QuantizedWeight(torch.zeros(9, 3, 8, dtype=torch.uint8), coeffs, group_size=32, shape=(3, 64))
    with pytest.raises(ValueError, match="in_features 64 is not divisible by group_size 48"):
        QuantizedWeight(planes, coeffs, group_size=48, shape=(3, 64))
    with pytest.raises(ValueError, match=r"planes shape \(2, 3, 8\) != expected \(2, 4, 8\)"):
        QuantizedWeight(planes, coeffs, group_size=32, shape=(4, 64))
    with pytest.raises(ValueError, match=r"coeffs shape \(2, 3, 3\) != expected \(1, 3, 3\)"):
        QuantizedWeight(planes, coeffs, group_size=64, shape=(3, 64))
    with pytest.raises(ValueError, match="coeffs must be torch.float16, got torch.float32"):
        QuantizedWeight(planes, coeffs.float(), group_size=32, shape=(3, 64))


def test_repr_and_stats():
    qw = build(torch.zeros(2, 64, dtype=torch.int64), torch.zeros(2, 1, 3), 2, 64,
               grid={"type": "bitplane"}, solver={"type": "rtn"}, stats=SolveStats(proxy_loss=1.5, time_s=0.1))
    assert repr(qw) == "QuantizedWeight(shape=(2, 64), k=2, group_size=64, bpw=2.750, grid=bitplane, solver=rtn)"
    assert qw.stats.to_dict() == {"proxy_loss": 1.5, "relative_loss": None, "time_s": 0.1, "best_iters": None}
    assert SolveStats(extra={"a": 1}).to_dict()["extra"] == {"a": 1}


def test_docs_format_example_bytes():
    """The worked example of docs/format.md: k=2, codes [3, 0, 1, 2, 0, 0, 0, 1] -> bytes [133, 9]."""
    codes = torch.tensor([[3, 0, 1, 2, 0, 0, 0, 1] * 4])
    qw = build(codes, torch.zeros(1, 1, 3), 2, 32)
    assert qw.planes[:, 0, 0].tolist() == [133, 9]


def test_the_cli_and_the_strategy_offer_the_dtype_names(capsys):
    """``DTYPE_NAMES`` is what ``bpdq eval/export --dtype`` and a strategy's ``dtype`` accept (the CLI writes
    the names out so that building its parser imports no torch)."""
    from typing import get_args

    from bpdq.cli import build_parser, cmd_eval
    from bpdq.strategy.model import Strategy

    assert DTYPE_NAMES == cmd_eval.DTYPES == ("auto", "float32", "bfloat16", "float16")
    assert [dtype_name(dtype_from_name(name)) for name in DTYPE_NAMES[1:]] == list(DTYPE_NAMES[1:])
    assert get_args(Strategy.model_fields["dtype"].annotation) == DTYPE_NAMES
    parser = build_parser()
    for command in (["eval", "model", "--text", "t.txt"], ["export", "model", "out"]):
        assert [parser.parse_args([*command, "--dtype", name]).dtype for name in DTYPE_NAMES] == list(DTYPE_NAMES)
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "--dtype", "float64"])
    assert "invalid choice: 'float64'" in capsys.readouterr().err
