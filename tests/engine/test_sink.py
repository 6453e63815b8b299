"""Sinks (bpdq/engine/sink.py): the atomic output directory, stale temporary directories, unwritable
targets, and the streaming checkpoint sink."""

from __future__ import annotations

import pytest
import torch

import bpdq
from bpdq.engine.sink import CheckpointSink, OutputDir, check_output_dir
from tests.tiny_models import TINY_RECIPE, tiny_model, tiny_model_dir, tiny_tokenizer


def leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_output_appears_only_at_commit_and_abort_leaves_nothing(tmp_path):
    out = OutputDir(tmp_path / "ckpt")
    (out.tmp / "a.txt").write_text("x")
    assert not (tmp_path / "ckpt").exists() and out.tmp.parent == tmp_path
    assert out.commit() == tmp_path / "ckpt" and (tmp_path / "ckpt" / "a.txt").read_text() == "x"
    again = OutputDir(tmp_path / "ckpt", overwrite=True)
    (again.tmp / "b.txt").write_text("y")
    again.abort()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["a.txt"] and leftovers(tmp_path, "ckpt") == []
    third = OutputDir(tmp_path / "ckpt", overwrite=True)
    (third.tmp / "c.txt").write_text("z")
    third.commit()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["c.txt"] and leftovers(tmp_path, "ckpt") == []


def test_stale_temporary_directories_of_the_same_target_are_removed(tmp_path):
    stale = tmp_path / ".ckpt.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    other = tmp_path / ".other.tmp-abc123"
    other.mkdir()
    out = OutputDir(tmp_path / "ckpt")
    assert not stale.exists() and other.exists(), "only the same target's leftovers go"
    out.abort()


def test_bad_targets_are_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)
    with pytest.raises(ValueError, match=r"output directory '.*file/ckpt' cannot be written"):
        check_output_dir(tmp_path / "file" / "ckpt", overwrite=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        check_output_dir(tmp_path / "full", overwrite=False)
    assert check_output_dir(tmp_path / "new" / "ckpt", overwrite=False) == tmp_path / "new" / "ckpt"
    assert leftovers(tmp_path / "new", "ckpt") == [] and not (tmp_path / "new" / "ckpt").exists()


def test_a_failing_save_leaves_nothing(tmp_path, monkeypatch):
    model, tok = tiny_model("llama", layers=1), tiny_tokenizer()
    bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, progress=False)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        bpdq.save(model, tok, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_sink_streams_layers_then_the_rest(tmp_path):
    model, tok = tiny_model("llama", layers=2), tiny_tokenizer()
    bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, progress=False)
    sink = CheckpointSink(tmp_path / "ckpt", tok, max_shard_size=1, extra_files=lambda report: {"extra.txt": "hi"})
    sink.write_layer("model.layers.0", model.model.layers[0])
    sink.write_layer("model.layers.1", model.model.layers[1])
    assert len(list(sink.out.tmp.glob(".shard-*"))) == 1, "a shard is written as soon as the next unit comes"
    state = model.state_dict()
    rest = {k: v for k, v in bpdq.checkpoint.unique_state_dict(model).items() if ".layers." not in k}
    sink.finish(model, rest, None)
    assert (tmp_path / "ckpt" / "extra.txt").read_text() == "hi"
    loaded, _ = bpdq.load(tmp_path / "ckpt")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k])


def test_an_output_on_an_input_is_refused_before_anything_is_removed(tmp_path):
    """Equal to, inside or a parent of the model directory or the calibration file: refused even with
    overwrite, links resolved; nothing is touched."""
    model = tiny_model_dir(tmp_path / "models" / "src", "llama", layers=1)
    calib = tmp_path / "data" / "calib.txt"
    calib.parent.mkdir()
    calib.write_text("some text " * 100)
    (tmp_path / "link").symlink_to(model)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    inputs = {"model directory": model, "calibration text": calib}
    for target, relation in [(model, "is the model directory"), (tmp_path / "link", "is the model directory"),
                             (tmp_path / "models", "contains the model directory"), (model / "q", "is inside the model"),
                             (tmp_path / "data", "contains the calibration text")]:
        with pytest.raises(ValueError, match=f"output '{target}' {relation}"):
            check_output_dir(target, overwrite=True, inputs=inputs)
    config = {"quantize": TINY_RECIPE, "calibration": {"text": str(calib), "samples": 2, "seq_len": 16},
              "output": str(tmp_path / "models"), "overwrite": True, "progress": False}
    with pytest.raises(ValueError, match="contains the model directory"):
        bpdq.quantize(model, config)
    with pytest.raises(ValueError, match="contains the calibration text"):
        bpdq.quantize(model, {**config, "output": str(tmp_path / "data")})
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_dangling_or_looping_link_is_refused_and_a_good_one_written_through(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ValueError, match=r"output '.*dangling' is a symbolic link to '.*nowhere', which does not exist"):
        check_output_dir(tmp_path / "dangling", overwrite=True)
    with pytest.raises(ValueError, match="output '.*loop' is a symbolic link that loops"):
        check_output_dir(tmp_path / "loop", overwrite=True)
    real = tmp_path / "disk" / "ckpt"
    real.mkdir(parents=True)
    (real / "old.txt").write_text("x")
    (tmp_path / "ckpt").symlink_to(real)
    bpdq.quantize(tiny_model("llama", layers=1), {"quantize": TINY_RECIPE, "output": str(tmp_path / "ckpt"),
                                                  "overwrite": True, "progress": False}, tokenizer=tiny_tokenizer())
    assert (tmp_path / "ckpt").is_symlink() and (tmp_path / "ckpt").resolve() == real
    assert (real / "model.safetensors").is_file() and not (real / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "dangling", "disk", "loop"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["ckpt"]
