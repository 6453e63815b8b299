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
        ({"calibration": {**TINY_CALIBRATION, "seed": 1}}, "calibration_sha256"),
        ({"rules": []}, "rules: "),
        ({"batch_size": 2}, "batch_size: 8 -> 2"),
    ]:
        with pytest.raises(ValueError, match="made by a different run") as exc:
            bpdq.quantize_model(src, output=out, resume="auto", **{**ARGS, **changes})
        assert named in str(exc.value) and "--resume never" in str(exc.value)
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
