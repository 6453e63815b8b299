"""Resume (bpdq/engine/resume.py): processes killed at several points and resumed give the checkpoint bytes
of an uninterrupted run; a state made by another run is refused naming the difference; the modes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bpdq
import bpdq.engine.loop as run_module
import bpdq.engine.sink
from bpdq.engine.interrupt import RunInterrupted, layers_begin, stop_at_layer_boundary, stop_requested
from bpdq.engine.resume import state_dir
from tests.tiny_models import TINY_CALIBRATION, TINY_RECIPE, tiny_model, tiny_model_dir, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
RECIPE = {**TINY_RECIPE, "solver": "gptq"}
RULES = [{"match": "lm_head", "grid": {"type": "bitplane", "planes": 3}}]  # the head reads the last layer's outputs
ARGS = dict(recipe=RECIPE, calibration=TINY_CALIBRATION, rules=RULES, progress=False, max_shard_size=1)

# Runs quantize_model in a fresh process and SIGKILLs it at a chosen point (argv: point, source, output).
KILLER = """
import json, os, signal, sys
import bpdq
import bpdq.engine.resume as resume
import bpdq.engine.loop as run
import bpdq.shards as shards

point, src, out, args = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "mid-run":  # as the third layer starts
    step = run.run_layer_step
    run.run_layer_step = lambda source, s, index, *a, **k: die() if index == 2 else step(source, s, index, *a, **k)
elif point == "writing-a-shard":  # half-way through writing the checkpoint's first shard (layer 0, as layer 1 comes)
    def flush(self):
        (self.directory / ".shard-00001.safetensors").write_bytes(b"half a shard")
        die()
    shards.ShardWriter._flush = flush
elif point == "first-layer":  # solved, written, but killed half-way through saving it into the state
    save = resume._save_tensors
    def save_tensors(path, tensors):
        if path.name == "layer-00000.safetensors":
            path.with_name(path.name + ".tmp").write_bytes(b"half a file")
            die()
        save(path, tensors)
    resume._save_tensors = save_tensors
bpdq.quantize_model(src, output=out, resume="auto", **args)
"""


def checkpoint_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix == ".safetensors" or p.name.endswith(".json")
            and p.name != "bpdq_report.json"}


def layers_done(output: Path) -> int:
    manifest = state_dir(output) / "manifest.json"
    return json.loads(manifest.read_text())["layers_done"] if manifest.is_file() else 0


def test_killed_runs_resume_to_the_uninterrupted_checkpoint_bytes(tmp_path):
    src = tiny_model_dir(tmp_path / "src", "llama", layers=3)
    points = {"first-layer": 0, "mid-run": 2, "writing-a-shard": 1}
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    # the same thread count as this process: its resumed runs must reproduce the killed ones' numbers
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    procs = {p: subprocess.Popen([sys.executable, str(script), p, str(src), str(tmp_path / p), json.dumps(ARGS)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in points}
    bpdq.quantize_model(src, output=tmp_path / "reference", **ARGS)  # meanwhile: the uninterrupted run
    reference = checkpoint_files(tmp_path / "reference")
    assert "model.safetensors.index.json" in reference  # a shard per unit: the resumed run must rebuild them all
    for point, done in points.items():
        _, err = procs[point].communicate(timeout=300)
        assert procs[point].returncode == -9, err
        assert not (tmp_path / point).exists() and layers_done(tmp_path / point) == done, point
        report = bpdq.quantize_model(src, output=tmp_path / point, resume="auto", **ARGS)
        assert checkpoint_files(tmp_path / point) == reference, point
        assert [m.name for m in report.modules][-1] == "lm_head" and len(report.modules) == 3 * 7 + 1
        assert not state_dir(tmp_path / point).exists(), "a finished run removes its state"
        assert not any(p.name.startswith(f".{point}.") for p in tmp_path.iterdir()), "nothing stale left"


def stop_after_first_layer(monkeypatch):
    monkeypatch.setattr(run_module, "stop_requested", lambda: True)


def test_a_state_from_another_run_is_refused_naming_the_difference(tmp_path, monkeypatch):
    src = tiny_model_dir(tmp_path / "src", "llama", layers=2)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        stop_after_first_layer(m)
        with pytest.raises(RunInterrupted, match="stopped after 1 of 2 decoder layers"):
            bpdq.quantize_model(src, output=out, resume="auto", **ARGS)
    assert layers_done(out) == 1 and not out.exists()
    for changes, named in [
        ({"recipe": {**RECIPE, "solver": "bpdq"}}, "recipe.solver.type: gptq -> bpdq"),
        ({"calibration": {**TINY_CALIBRATION, "seed": 1}}, "calibration.seed: 0 -> 1"),
        ({"rules": []}, "rules: "),
        ({"batch_size": 2}, "batch_size: 8 -> 2"),
    ]:
        with pytest.raises(ValueError, match="made by a different run") as exc:
            bpdq.quantize_model(src, output=out, resume="auto", **{**ARGS, **changes})
        assert named in str(exc.value) and "pass resume='never' to start over" in str(exc.value)
        assert layers_done(out) == 1, "a refused resume keeps the state"
    (src / "config.json").write_text((src / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    with pytest.raises(ValueError, match="model.config_sha256"):
        bpdq.quantize_model(src, output=out, resume="required", **ARGS)
    bpdq.quantize_model(src, output=out, resume="never", **ARGS)  # starts over
    assert out.is_dir() and not state_dir(out).exists()
    with pytest.raises(ValueError, match="resume='required' but there is no resume state"):
        bpdq.quantize_model(src, output=tmp_path / "other", resume="required", **ARGS)
    with pytest.raises(ValueError, match="resume must be one of auto, never, required; got 'yes'"):
        bpdq.quantize_model(src, output=tmp_path / "other", resume="yes", **ARGS)
    with pytest.raises(ValueError, match="resume needs output="):
        bpdq.quantize_model(tiny_model(), tiny_tokenizer(), resume="auto", recipe=RECIPE, calibration=TINY_CALIBRATION)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_resume_with_the_levers_and_an_in_memory_model(tmp_path, monkeypatch):
    """Asymmetric calibration and tuning (the fp stream is saved), the bit allocation (its rules are saved),
    offloaded activations; the in-memory model gets the restored layers."""
    args = {**ARGS, "rules": [], "asymmetric": True, "tuning": {"steps": 2}, "target_bpw": 3.0,
            "calibration": {**TINY_CALIBRATION, "offload": "9KB"}, "batch_size": 4}
    tok = tiny_tokenizer()
    bpdq.quantize_model(tiny_model(layers=3), tok, output=tmp_path / "reference", **args)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        stop_after_first_layer(m)
        with pytest.raises(RunInterrupted):
            bpdq.quantize_model(tiny_model(layers=3), tok, output=out, resume="auto", **args)
    saved = json.loads((state_dir(out) / "manifest.json").read_text())
    assert saved["stages"]["allocation"]["rules"] and len(saved["stages"]["tuning"]["results"]) == 1
    assert sorted(p.name for p in (state_dir(out) / "inputs-00001").iterdir()) == ["fp-00000.safetensors", "fp-00001.safetensors",
                                                                                 "hidden-00000.safetensors", "hidden-00001.safetensors"]
    model = tiny_model(layers=3)
    report = bpdq.quantize_model(model, tok, output=out, resume="required", **args)
    assert checkpoint_files(out) == checkpoint_files(tmp_path / "reference")
    assert [t["layer"] for t in report.tuning] == [f"model.layers.{i}" for i in range(3)] and report.allocation
    reloaded, _ = bpdq.load(out)
    mine, theirs = model.state_dict(), reloaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_asks_for_a_stop_and_the_second_interrupts(sig):
    before = signal.getsignal(sig)
    with stop_at_layer_boundary():
        with pytest.raises(KeyboardInterrupt):  # before the layers: nothing to save, it stops at once
            os.kill(os.getpid(), sig)
    with stop_at_layer_boundary():
        layers_begin()
        assert not stop_requested()
        os.kill(os.getpid(), sig)
        assert stop_requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)
    assert not stop_requested() and signal.getsignal(sig) is before


# ---- a run without a head rule (the default): nothing is saved after the last layer ---------------------

PLAIN = {**ARGS, "rules": []}


def reference_checkpoint(src, path):
    bpdq.quantize_model(src, output=path, **PLAIN)
    return checkpoint_files(path)


def test_a_stop_in_the_last_layer_finishes_the_run(tmp_path, monkeypatch):
    """After the last layer only the final write is left: a stop asked during it does not interrupt."""
    src = tiny_model_dir(tmp_path / "src", "llama", layers=2)
    reference = reference_checkpoint(src, tmp_path / "reference")
    step = run_module.run_layer_step
    asked = []

    def stop_in_last_layer(source, plan, index, *a, **k):
        asked.append(index == 1)
        return step(source, plan, index, *a, **k)

    monkeypatch.setattr(run_module, "run_layer_step", stop_in_last_layer)
    monkeypatch.setattr(run_module, "stop_requested", lambda: asked[-1])
    try:
        bpdq.quantize_model(src, output=tmp_path / "out", resume="auto", **PLAIN)
    except RunInterrupted as exc:  # a KeyboardInterrupt: it would end the whole session
        pytest.fail(f"interrupted after the last layer: {exc}")
    assert checkpoint_files(tmp_path / "out") == reference and not state_dir(tmp_path / "out").exists()


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_final_write_resumes_to_the_same_checkpoint(tmp_path, monkeypatch, failure):
    """A full disk on the last shard (or a second Ctrl-C, or a kill) while the checkpoint is written, after
    every layer is saved: the same call finishes the run from the state."""
    src = tiny_model_dir(tmp_path / "src", "llama", layers=2)
    reference = reference_checkpoint(src, tmp_path / "reference")
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        def fail(*a, **k):
            raise failure
        m.setattr(bpdq.engine.sink.CheckpointSink, "finish", fail)
        with pytest.raises(type(failure)):
            bpdq.quantize_model(src, output=out, resume="auto", **PLAIN)
    assert layers_done(out) == 2 and not out.exists()
    report = bpdq.quantize_model(src, output=out, resume="required", **PLAIN)
    assert checkpoint_files(out) == reference and len(report.modules) == 2 * 7
    assert not state_dir(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference", "src"]


# ---- integrity: every file of the state is checked before any work --------------------------------------


@pytest.fixture
def stopped(tmp_path, monkeypatch):
    """``(src, out)``: a 3-layer run without a head rule, stopped after its first layer."""
    src = tiny_model_dir(tmp_path / "src", "llama", layers=3)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        stop_after_first_layer(m)
        with pytest.raises(RunInterrupted):
            bpdq.quantize_model(src, output=out, resume="auto", **PLAIN)
    return src, out


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["layer-00000.safetensors", "inputs-00001/hidden-00000.safetensors"])
def test_flipped_bytes_in_a_state_file_are_refused_naming_it(stopped, name):
    src, out = stopped
    flip_last_byte(state_dir(out) / name)
    with pytest.raises(ValueError, match="pass resume='never' to start over") as exc:
        bpdq.quantize_model(src, output=out, resume="auto", **PLAIN)
    assert f"{state_dir(out) / name} is damaged" in str(exc.value) and not out.exists()


@pytest.mark.parametrize("value, named", [(99, "layers_done is 99; the model has 3 decoder layers"),
                                          (-1, "layers_done is -1"), ("abc", 'layers_done is "abc", not a JSON int')])
def test_a_manifest_with_a_bad_layer_count_is_refused_naming_it(stopped, value, named):
    src, out = stopped
    manifest = state_dir(out) / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "layers_done": value}))
    with pytest.raises(ValueError, match="pass resume='never'") as exc:
        bpdq.quantize_model(src, output=out, resume="auto", **PLAIN)
    assert named in str(exc.value) and str(manifest) in str(exc.value)


@pytest.mark.parametrize("content, named", [(lambda data: data[:-100], "has"),
                                            (lambda data: b"\x80\x04\x95" + b"\x00" * (len(data) - 3), "is damaged")])
def test_a_truncated_or_replaced_layer_file_is_named(stopped, content, named):
    src, out = stopped
    path = state_dir(out) / "layer-00000.safetensors"
    path.write_bytes(content(path.read_bytes()))
    with pytest.raises(ValueError) as exc:
        bpdq.quantize_model(src, output=out, resume="auto", **PLAIN)
    assert f"resume state file {path} {named}" in str(exc.value)


def test_a_changed_model_file_header_is_refused(stopped):
    """Same size, same config.json: the shard's header hash tells."""
    src, out = stopped
    shard = next(p for p in sorted(src.glob("*.safetensors")))
    shard.write_bytes(shard.read_bytes().replace(b'"format":"pt"', b'"format":"xx"', 1))
    with pytest.raises(ValueError, match=rf"model\.files\.{shard.name}\.header_sha256"):
        bpdq.quantize_model(src, output=out, resume="auto", **PLAIN)


def test_a_full_disk_while_saving_the_state_names_the_file(tmp_path, monkeypatch):
    import safetensors.torch

    src = tiny_model_dir(tmp_path / "src", "llama", layers=2)
    out = tmp_path / "out"

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"part")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="cannot save the resume state file .*layer-00000.safetensors .*No space left") as exc:
        bpdq.quantize_model(src, output=out, resume="auto", **PLAIN)
    assert exc.value.errno == 28 and not list(state_dir(out).glob("*.tmp")) and not out.exists()


def test_a_failure_in_the_first_layer_leaves_no_state(tmp_path, monkeypatch):
    src = tiny_model_dir(tmp_path / "src", "llama", layers=2)

    def broken(*a, **k):
        raise ValueError("no solution")

    monkeypatch.setattr(run_module, "quantize_weight", broken)
    with pytest.raises(ValueError, match="cannot quantize model.layers.0.self_attn.q_proj: no solution"):
        bpdq.quantize_model(src, output=tmp_path / "out", resume="auto", **PLAIN)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
