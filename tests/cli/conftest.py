"""CLI test helpers: run ``python -m bpdq.cli`` in a subprocess; a tiny random model directory; configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tiny_models import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


def run_cli(
    *args: str, cwd: Path | None = None, extra_path: Path | None = None, threads: int | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python -m bpdq.cli ARGS`` (stdout/stderr captured, never a terminal)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if extra_path is not None:
        env["PYTHONPATH"] = f"{extra_path}{os.pathsep}{REPO}"
    return subprocess.run(
        [sys.executable, "-m", "bpdq.cli", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def json_stdout(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    """The single JSON object a ``--json`` command prints (fails if stdout holds anything else)."""
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 64) with a small BPE tokenizer, saved as a transformers directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", layers=2).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_strategy(model_dir: Path, output: Path | None = None, **changes: Any) -> dict[str, Any]:
    """A valid strategy for the tiny model: RTN 2-bit bit-plane, group 32, layer 0's mlp.down_proj at 3 planes."""
    data: dict[str, Any] = {
        "model": str(model_dir),
        "calibration": {"text": "builtin:python-docs", "samples": 4, "seq_len": 32, "seed": 0, "asymmetric": False},
        "quantize": {"group_size": 32, "grid": {"type": "bitplane", "planes": 2}, "solver": {"type": "rtn"}},
        "rules": [
            {"match": r"model\.layers\.0\.mlp\.down_proj", "grid": {"type": "bitplane", "planes": 3}},
            {"match": r"model\.layers\.1\.self_attn\.o_proj", "skip": True},
        ],
        "device": "cpu",
    }
    if output is not None:
        data["output"] = str(output)
    data.update(changes)
    return data


def run_many(cases: dict[str, list[str]], **kwargs: Any) -> dict[str, subprocess.CompletedProcess]:
    """Run several ``python -m bpdq.cli`` invocations concurrently (each start imports torch: seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_cli, *args, threads=1, **kwargs) for name, args in cases.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.fixture
def in_process():
    """Call ``bpdq.cli.main`` in this process; the logging handler it installs is removed afterwards."""
    import logging

    from bpdq.cli import main

    logger = logging.getLogger("bpdq")
    level, handlers = logger.level, list(logger.handlers)
    yield main
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model_dir):
    """``(process, output dir)`` of one ``quantize`` run on the tiny model; the config says group_size 64,
    ``--set`` makes it 32."""
    d = tmp_path_factory.mktemp("tiny-quantize")
    data = tiny_strategy(tiny_model_dir, d / "ckpt")
    data["quantize"]["group_size"] = 64
    cfg = write_config(d / "strategy.yaml", data)
    proc = run_cli("quantize", str(cfg), "--set", "quantize.group_size=32")
    assert proc.returncode == 0, proc.stderr
    return proc, d / "ckpt"


@pytest.fixture
def truncated_checkpoint(tmp_path, tiny_checkpoint):
    """A copy of the tiny checkpoint whose model.safetensors lost its last 100 bytes."""
    import shutil

    path = Path(shutil.copytree(tiny_checkpoint[1], tmp_path / "truncated"))
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return path


@pytest.fixture
def tokenizerless_checkpoint(tmp_path, tiny_checkpoint):
    """A copy of the tiny checkpoint without its tokenizer files (as a run on a weights-only directory writes it)."""
    import shutil

    path = Path(shutil.copytree(tiny_checkpoint[1], tmp_path / "no-tokenizer"))
    for p in path.iterdir():
        if p.name.startswith("tokenizer") or p.name in ("special_tokens_map.json", "chat_template.jinja"):
            p.unlink()
    return path


@pytest.fixture
def truncated_config_checkpoint(tmp_path, tiny_checkpoint):
    """A copy of the tiny checkpoint whose config.json lost its second half."""
    import shutil

    path = Path(shutil.copytree(tiny_checkpoint[1], tmp_path / "truncated-config"))
    config = path / "config.json"
    config.write_text(config.read_text()[: len(config.read_text()) // 2])
    return path
