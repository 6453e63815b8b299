"""One run per output (bpdq/engine/lock.py): a second process is refused at once naming the holder; the lock
goes with its holder, SIGKILL included; spill directories of killed runs are swept, live ones kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bpdq
from bpdq.engine.lock import lock_output, lock_path, locked_tempdir, sweep_stale
from tests.tiny_models import TINY_RECIPE, tiny_model_dir

REPO = Path(__file__).resolve().parents[2]
HOLDER = """
import sys, time
from bpdq.engine.lock import lock_output
with lock_output(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of ``tmp_path / "out"``."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "out")], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_second_process_is_refused_naming_the_holder_until_it_is_killed(tmp_path, holder):
    out = tmp_path / "out"
    start = time.monotonic()
    with pytest.raises(ValueError, match=rf"output '{out}' is in use by process {holder.pid} "):
        with lock_output(out):
            pass
    src = tiny_model_dir(tmp_path / "src", "llama", layers=1)
    with pytest.raises(ValueError, match=f"in use by process {holder.pid}"):
        bpdq.quantize(src, {"quantize": TINY_RECIPE, "output": str(out), "resume": "auto", "progress": False})
    assert time.monotonic() - start < 30 and sorted(p.name for p in tmp_path.iterdir()) == [".out.bpdq-lock", "src"]
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with lock_output(out) as path:  # the kernel released it with its holder
        assert path == lock_path(out) and path.read_text() == f"{os.getpid()}\n"
    assert not path.exists(), "a holder ending normally removes the file"


def test_the_same_process_may_lock_again(tmp_path):
    out = tmp_path / "out"
    with lock_output(out):
        with lock_output(out):
            pass
        assert lock_path(out).exists(), "still held by the outer one"
    assert not lock_path(out).exists()


def test_spill_directories_of_dead_runs_are_swept_and_live_ones_kept(tmp_path):
    dead = tmp_path / "bpdq-activations-dead"
    dead.mkdir()
    (dead / ".lock").touch()  # what a SIGKILLed run leaves: nobody holds it
    (dead / "hidden-00000001.safetensors").write_bytes(b"x" * 100)
    foreign = tmp_path / "bpdq-activations-foreign"  # not made by locked_tempdir: left alone
    foreign.mkdir()
    with locked_tempdir("bpdq-activations-", tmp_path) as live:
        assert not dead.exists() and foreign.exists() and live.is_dir()
        sweep_stale(tmp_path, "bpdq-activations-")  # another run starting meanwhile
        assert live.is_dir()
    assert not live.exists()
