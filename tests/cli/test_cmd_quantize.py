"""``bpdq quantize`` on a tiny random Llama: summary, checkpoint contents, --set, --overwrite
(bpdq/cli/cmd_quantize.py)."""

from __future__ import annotations

import contextlib
import json

import pytest
import yaml
import torch
from safetensors.torch import load_file
from torch import nn

import bpdq
from bpdq import QuantLinear
from bpdq.cli.summary import STRATEGY_FILE
from bpdq.strategy import load_strategy
from tests.cli.conftest import json_stdout, run_cli


@pytest.fixture(scope="module")
def reloaded(tiny_checkpoint):
    model, _ = bpdq.load(tiny_checkpoint[1])
    return model


def test_prints_a_plain_summary_table_and_plain_progress_lines(tiny_checkpoint):
    proc, out = tiny_checkpoint
    for label in ("modules quantized", "modules skipped", "bits/weight (whole model)", "size vs fp16", "worst 5"):
        assert label in proc.stdout
    assert f"checkpoint written to {out}" in proc.stdout
    assert "layer 1/2" in proc.stderr and "layer 2/2" in proc.stderr
    assert "\x1b[" not in proc.stdout + proc.stderr  # not a terminal: no ANSI codes


def test_the_recipe_rules_and_set_override_reach_the_checkpoint(reloaded):
    quant = {n: m for n, m in reloaded.named_modules() if isinstance(m, QuantLinear)}
    assert len(quant) == 13
    assert isinstance(reloaded.get_submodule("model.layers.1.self_attn.o_proj"), nn.Linear)
    assert {m.group_size for m in quant.values()} == {32}  # --set quantize.group_size=32 over the config's 64
    assert quant.pop("model.layers.0.mlp.down_proj").k == 3
    assert {m.k for m in quant.values()} == {2}


def test_saved_summary_matches_the_checkpoint(tiny_checkpoint, reloaded):
    _, out = tiny_checkpoint
    summary = json.loads((out / "bpdq_summary.json").read_text())
    quant = [m for m in reloaded.modules() if isinstance(m, QuantLinear)]
    n = sum(m.in_features * m.out_features for m in quant)
    bits = sum(m.in_features * m.out_features * (m.k + 16 * (m.k + 1) / m.group_size) for m in quant)
    total = sum(p.numel() for p in reloaded.parameters()) + n  # a QuantLinear's weight is buffers, not a parameter
    assert summary["modules_quantized"] == 13 and summary["modules_skipped"] == 1
    assert summary["avg_bpw_quantized"] == pytest.approx(bits / n)
    assert summary["checkpoint_bytes"] == (out / "model.safetensors").stat().st_size
    assert summary["fp16_bytes"] == 2 * total
    assert summary["avg_bpw_model"] == pytest.approx((bits + 16 * (total - n)) / total)
    assert summary["worst_modules"] == []  # RTN only: a data-free run, no Hessian and no proxy loss


def test_the_strategy_is_saved_beside_the_checkpoint(tiny_checkpoint):
    _, out = tiny_checkpoint
    saved = load_strategy(out / "strategy.yaml")
    assert saved.quantize.group_size == 32 and saved.output == str(out)
    assert [r.match for r in saved.rules] == [r"model\.layers\.0\.mlp\.down_proj", r"model\.layers\.1\.self_attn\.o_proj"]


def test_overwrite_replaces_a_directory_and_reproduces_the_weights(tiny_checkpoint, tmp_path):
    _, out = tiny_checkpoint
    target = tmp_path / "again"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    proc = run_cli("quantize", str(out / "strategy.yaml"), "--output", str(target), "--overwrite", "--json")
    summary = json_stdout(proc)  # --json: stdout is exactly one JSON object
    assert summary["output"] == str(target) and summary["modules_quantized"] == 13
    assert not (target / "stale.txt").exists()
    first, second = load_file(str(out / "model.safetensors")), load_file(str(target / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)  # same seed, same windows: same checkpoint


WAITING_PLUGIN = """
import os, pathlib, time
import bpdq.engine.interrupt as resume
from bpdq.registry import SOLVERS
from bpdq.solvers.rtn import RTN

@SOLVERS.register("waiting-rtn")
class WaitingRTN(RTN):
    requires_hessian = True

    def _solve(self, W, H, grid, group_size):
        marker = pathlib.Path(os.environ["BPDQ_TEST_MARKER"])
        if not marker.exists():  # the first solve of the first run waits for the signal
            marker.touch()
            deadline = time.monotonic() + 120
            while not resume.stop_requested() and time.monotonic() < deadline:
                time.sleep(0.05)
        return super()._solve(W, H, grid, group_size)
"""


def test_ctrl_c_finishes_the_layer_keeps_the_state_and_exits_130(tmp_path, tiny_model_dir):
    """SIGINT (SIGTERM takes the same handler: tests/engine/test_resume.py; the same command resuming:
    tests/engine/test_distributed.py)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.cli.conftest import REPO, tiny_strategy, write_config

    (tmp_path / "plugin.py").write_text(WAITING_PLUGIN)
    strategy = tiny_strategy(tiny_model_dir, tmp_path / "out")
    strategy["quantize"]["solver"] = {"type": "waiting-rtn"}
    cfg = write_config(tmp_path / "s.yaml", strategy)
    marker = tmp_path / "solving"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), BPDQ_TEST_MARKER=str(marker))
    command = [sys.executable, "-m", "bpdq.cli", "quantize", str(cfg), "--plugin", str(tmp_path / "plugin.py")]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), proc.communicate()[1]
    assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()), "the run writes into a temporary directory"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped after 1 of 2 decoder layers" in err and "run the same command again to resume" in err
    state = tmp_path / ".out.bpdq-resume"
    assert json.loads((state / "manifest.json").read_text())["layers_done"] == 1
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())


def test_resume_required_without_a_state_is_a_usage_error(in_process, capsys, tmp_path, tiny_model_dir):
    from tests.cli.conftest import tiny_strategy, write_config

    cfg = write_config(tmp_path / "s.yaml", tiny_strategy(tiny_model_dir, tmp_path / "out"))
    assert in_process(["quantize", str(cfg), "--resume", "required"]) == 2
    err = capsys.readouterr().err
    assert "--resume required: there is no resume state at" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_an_unwritable_output_is_named_before_any_work(in_process, capsys, tmp_path, tiny_model_dir):
    from tests.cli.conftest import tiny_strategy, write_config

    (tmp_path / "file").write_text("not a directory")
    cfg = write_config(tmp_path / "s.yaml", tiny_strategy(tiny_model_dir))
    out = tmp_path / "file" / "out"
    assert in_process(["quantize", str(cfg), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"output directory '{out}' cannot be written" in err and "Traceback" not in err


def test_overwrite_never_replaces_the_model_directory(in_process, capsys, tmp_path, tiny_model_dir):
    import shutil

    from tests.cli.conftest import tiny_strategy, write_config

    model = shutil.copytree(tiny_model_dir, tmp_path / "models" / "src")
    before = sorted(p.name for p in model.iterdir())
    cfg = write_config(tmp_path / "s.yaml", tiny_strategy(model))
    for out, relation in [(model, "is the model directory"), (tmp_path / "models", "contains the model directory")]:
        assert in_process(["quantize", str(cfg), "-o", str(out), "--overwrite"]) == 2
        assert f"output '{out}' {relation} '{model}'" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == before and sorted(p.name for p in tmp_path.iterdir()) == ["models", "s.yaml"]


def test_a_dangling_link_as_output_is_refused_before_any_work(in_process, capsys, tmp_path, tiny_model_dir):
    from tests.cli.conftest import tiny_strategy, write_config

    (tmp_path / "out").symlink_to(tmp_path / "gone")
    cfg = write_config(tmp_path / "s.yaml", tiny_strategy(tiny_model_dir, tmp_path / "out"))
    assert in_process(["quantize", str(cfg)]) == 2
    assert "is a symbolic link to" in capsys.readouterr().err


def test_a_second_run_on_an_output_in_use_exits_2_naming_the_holder(in_process, capsys, tmp_path, tiny_model_dir):
    import subprocess
    import sys

    from tests.cli.conftest import REPO, tiny_strategy, write_config

    holder = "import sys, time\nfrom bpdq.engine.lock import lock_output\nwith lock_output(sys.argv[1]):\n" \
             "    print('locked', flush=True)\n    time.sleep(120)\n"
    proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": ""})
    try:
        assert proc.stdout.readline().strip() == "locked"
        cfg = write_config(tmp_path / "s.yaml", tiny_strategy(tiny_model_dir, tmp_path / "out"))
        assert in_process(["quantize", str(cfg), "--resume", "never"]) == 2
        assert f"is in use by process {proc.pid}" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()


def test_a_resume_refused_for_a_changed_recipe_exits_2_with_the_flags(in_process, capsys, tmp_path, tiny_model_dir,
                                                                     monkeypatch):
    import bpdq.engine.loop as loop
    from tests.cli.conftest import tiny_strategy, write_config

    cfg = write_config(tmp_path / "s.yaml", tiny_strategy(tiny_model_dir, tmp_path / "out"))
    with monkeypatch.context() as m:
        m.setattr(loop, "stop_requested", lambda: True)
        assert in_process(["quantize", str(cfg)]) == 130
    capsys.readouterr()
    assert in_process(["quantize", str(cfg), "--set", "quantize.group_size=64", "--resume", "required"]) == 2
    err = capsys.readouterr().err
    assert "recipe.group_size: 32 -> 64" in err and "pass --resume never to start over" in err and "resume='" not in err
    assert (tmp_path / ".out.bpdq-resume" / "manifest.json").is_file() and not (tmp_path / "out").exists()


def test_the_levers_run_from_the_config_and_reach_the_json_summary(in_process, capsys, tmp_path, tiny_model_dir):
    from tests.cli.conftest import tiny_strategy, write_config

    data = tiny_strategy(tiny_model_dir, rules=[], target_bpw=2.6, tuning={"steps": 2})
    data["quantize"]["solver"] = {"type": "gptq"}
    data["calibration"]["asymmetric"] = True
    cfg = write_config(tmp_path / "s.yaml", data)
    assert in_process(["quantize", str(cfg), "-o", str(tmp_path / "out"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["asymmetric"] == {"damp": 0.1}
    assert [t["layer"] for t in summary["tuning"]] == ["model.layers.0", "model.layers.1"]
    assert summary["allocation"]["target_bpw"] == 2.6 and summary["avg_bpw_quantized"] <= 2.6
    assert json.loads((tmp_path / "out" / "bpdq_summary.json").read_text()) == summary
    from rich.console import Console

    from bpdq.cli.summary import summary_tables

    console = Console(record=True, width=200)
    for table in summary_tables(summary):
        console.print(table)
    text = console.export_text()
    assert "asymmetric calibration" in text and "coefficient tuning  " in text and "2 layers" in text
    assert "bit allocation" in text and "target 2.6" in text


def test_a_lever_in_a_plain_run_leaves_no_entry(in_process, capsys, tmp_path, tiny_model_dir):
    from tests.cli.conftest import tiny_strategy, write_config

    cfg = write_config(tmp_path / "s.yaml", tiny_strategy(tiny_model_dir))
    assert in_process(["quantize", str(cfg), "-o", str(tmp_path / "out"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert not {"asymmetric", "tuning", "allocation"} & set(summary)


def test_flags_without_a_file_quantize_and_the_checkpoint_reloads(in_process, capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    args = ["quantize", "--model", str(tiny_model_dir), "--method", "gptq", "--bits", "3", "--group-size", "32",
            "--samples", "8", "--calibration", "builtin:python-docs", "--set", "calibration.seq_len=32",
            "--output", str(out), "--json"]
    assert in_process(args) == 0
    summary = json.loads(capsys.readouterr().out)
    strategy = yaml.safe_load((out / STRATEGY_FILE).read_text())
    assert strategy["quantize"]["grid"]["type"] == "uniform" and strategy["quantize"]["grid"]["bits"] == 3
    assert strategy["quantize"]["solver"]["type"] == "gptq" and strategy["quantize"]["group_size"] == 32
    assert strategy["calibration"]["samples"] == 8 and summary["modules_quantized"] == 14
    model, _ = bpdq.load(out)
    layers = [m for m in model.modules() if isinstance(m, bpdq.QuantLinear)]
    assert len(layers) == 14 and {m.group_size for m in layers} == {32}


def test_flags_override_the_file(in_process, capsys, tmp_path, tiny_model_dir):
    from tests.cli.conftest import tiny_strategy, write_config

    cfg = write_config(tmp_path / "s.yaml", tiny_strategy(tiny_model_dir, tmp_path / "out", rules=[]))
    assert in_process(["quantize", str(cfg), "--bits", "3", "--samples", "5"]) == 0
    strategy = yaml.safe_load((tmp_path / "out" / STRATEGY_FILE).read_text())
    assert strategy["quantize"]["grid"]["planes"] == 3 and strategy["calibration"]["samples"] == 5


@pytest.mark.parametrize("args, message", [
    ([], "give a strategy config file, or --model"),
    (["--model", "m", "--bits", "9"], "--bits: must be 1..8"),
    (["--model", "m", "--method", "awq"], "invalid choice: 'awq'"),
    (["--model", "m", "--group-size", "0"], "--group-size: must be a positive integer"),
])
def test_bad_flags_exit_2_naming_the_problem(in_process, capsys, args, message):
    with pytest.raises(SystemExit) if message.startswith(("--", "invalid")) else contextlib.nullcontext():
        code = in_process(["quantize", *args])
        assert code == 2
    assert message in capsys.readouterr().err


def test_the_cli_pins_the_mmap_threshold_for_its_process(in_process, capsys, tmp_path, tiny_model_dir, monkeypatch):
    import bpdq.engine.source as source
    from tests.cli.conftest import tiny_strategy, write_config

    calls = []
    monkeypatch.setattr(source, "cap_mmap_threshold", lambda threshold=None: calls.append(threshold) or True)
    cfg = write_config(tmp_path / "s.yaml", tiny_strategy(tiny_model_dir))
    assert in_process(["quantize", str(cfg), "-o", str(tmp_path / "out"), "--json"]) == 0
    assert calls == [source.SKELETON_MMAP_THRESHOLD, None]  # the CLI owns its process; a library call does not
