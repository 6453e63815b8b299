"""``bpdq quantize`` stops at once on SIGINT/SIGTERM while it loads the model or captures the calibration
inputs (bpdq/engine/interrupt.py): nothing is saved yet, so it does not wait for the end of the first layer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.cli.conftest import REPO, tiny_strategy, write_config

#: Makes loading the model directory, or capturing the first layer's inputs, wait (up to 60 s) after touching
#: the marker; a wait that runs to its end leaves a second marker.
SLOW_PLUGIN = """
import os, pathlib, time
import bpdq.engine.loop as loop
import bpdq.engine.source as source

def slow(function):
    def wrapper(*args, **kwargs):
        marker = pathlib.Path(os.environ["BPDQ_TEST_MARKER"])
        if not marker.exists():
            marker.touch()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.05)
            marker.with_suffix(".waited").touch()
        return function(*args, **kwargs)
    return wrapper

if os.environ["BPDQ_TEST_PHASE"] == "load":
    source.LazySource.__init__ = slow(source.LazySource.__init__)
else:
    loop.capture_layer_inputs = slow(loop.capture_layer_inputs)
"""


@pytest.mark.parametrize("phase, sig", [("load", signal.SIGTERM), ("capture", signal.SIGINT)])
def test_a_signal_while_loading_or_capturing_stops_at_once(tmp_path, tiny_model_dir, phase, sig):
    (tmp_path / "plugin.py").write_text(SLOW_PLUGIN)
    strategy = tiny_strategy(tiny_model_dir, tmp_path / "out")
    strategy["quantize"]["solver"] = {"type": "gptq"}  # calibrated: the inputs are captured
    cfg = write_config(tmp_path / "s.yaml", strategy)
    marker = tmp_path / "slow"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), BPDQ_TEST_MARKER=str(marker),
               BPDQ_TEST_PHASE=phase, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "bpdq.cli", "quantize", str(cfg), "--plugin", str(tmp_path / "plugin.py")]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert not marker.with_suffix(".waited").exists(), f"the {phase} ran on after the signal"
    assert "bpdq quantize: interrupted" in err and "stopped after" not in err
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())
