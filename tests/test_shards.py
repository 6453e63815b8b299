"""Safetensors weight directories (bpdq/shards.py): sizes, shard writing in units, reading headers and tensors,
refusing pickle weights and missing shards."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bpdq.shards import INDEX_FILE, WEIGHTS_FILE, ShardWriter, WeightFiles, parse_size


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("2KB") == 2000 and parse_size("1KiB") == 1024 and parse_size("1.5 MB") == 1_500_000
    assert parse_size("5gb") == 5 * 10**9
    for bad in ("", "MB", "-1MB", "1TB", 0, -5, True, 1.5):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


def units():
    g = torch.Generator().manual_seed(0)
    return [{f"layers.{i}.w": torch.randn(64, 16, generator=g), f"layers.{i}.b": torch.randn(64, generator=g)} for i in range(4)]


def test_one_shard_is_model_safetensors_without_index(tmp_path):
    w = ShardWriter(tmp_path, "1MB")
    for u in units():
        w.add(u)
    assert w.close() == [tmp_path / WEIGHTS_FILE]
    assert not (tmp_path / INDEX_FILE).exists()
    stored = load_file(str(tmp_path / WEIGHTS_FILE))
    for u in units():
        for k, v in u.items():
            assert torch.equal(stored[k], v)


def test_units_never_straddle_shards_and_the_index_lists_every_tensor(tmp_path):
    unit_bytes = (64 * 16 + 64) * 4
    w = ShardWriter(tmp_path, 2 * unit_bytes + 10)  # two units per shard
    for u in units():
        w.add(u)
    files = w.close()
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 4 * unit_bytes
    assert index["weight_map"]["layers.1.w"] == files[0].name and index["weight_map"]["layers.2.b"] == files[1].name
    assert sorted(index["weight_map"]) == sorted(k for u in units() for k in u)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f.name for f in files] + [INDEX_FILE])


def test_a_unit_larger_than_a_shard_gets_its_own(tmp_path):
    w = ShardWriter(tmp_path, 100)
    for u in units()[:2]:
        w.add(u)
    assert len(w.close()) == 2


def test_a_tensor_written_twice_is_an_error(tmp_path):
    w = ShardWriter(tmp_path, 100)
    w.add(units()[0])
    with pytest.raises(ValueError, match="written twice"):
        w.add(units()[0])


def test_weight_files_reads_headers_then_only_the_asked_tensors(tmp_path):
    w = ShardWriter(tmp_path, 100)
    for u in units():
        w.add(u)
    w.close()
    files = WeightFiles(tmp_path)
    assert len(files.files) == 4 and files.meta["layers.3.w"].shape == (64, 16) and files.meta["layers.3.w"].is_meta
    got = files.read(["layers.2.w", "layers.0.b"])
    assert torch.equal(got["layers.2.w"], units()[2]["layers.2.w"]) and set(got) == {"layers.2.w", "layers.0.b"}
    maps = open("/proc/self/maps").read()
    assert str(tmp_path) not in maps, "a read tensor must not keep its file mapped"
    with pytest.raises(ValueError, match="'nope'"):
        files.read(["nope"])


def test_pickle_only_directories_are_refused_without_unpickling(tmp_path, monkeypatch):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle file was opened"))
    with pytest.raises(ValueError, match="pytorch_model.bin.*bpdq reads safetensors only"):
        WeightFiles(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match="holds no model.safetensors"):
        WeightFiles(tmp_path)


def test_missing_shards_and_bad_indexes_are_named(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                                  "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="names shard 'model-00002-of-00002.safetensors', which is missing"):
        WeightFiles(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match="same directory"):
        WeightFiles(tmp_path)
    (tmp_path / INDEX_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a valid safetensors index"):
        WeightFiles(tmp_path)


def test_a_corrupt_file_is_named(tmp_path):
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a valid safetensors file"):
        WeightFiles(tmp_path)


def test_abort_closes_and_removes_the_scratch_file(tmp_path):
    w = ShardWriter(tmp_path, "1MB")
    w.add(units()[0])
    scratch = w._scratch
    assert scratch is not None and not scratch.closed
    w.abort()
    assert scratch.closed  # the descriptor (and a deleted file's disk space) is not left to the traceback
    assert list(tmp_path.iterdir()) == []
    w.abort()  # twice: nothing left to do


def test_a_checkpoint_sink_s_abort_closes_its_writer(tmp_path):
    from bpdq.engine.sink import CheckpointSink

    sink = CheckpointSink(tmp_path / "out", None)
    sink.write_tensors(units()[0])
    scratch = sink.writer._scratch
    assert scratch is not None
    sink.abort()
    assert scratch.closed and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
