"""Argument parsing, exit codes and error messages of ``python -m bpdq.cli`` (bpdq/cli/main.py).

Exit 2 (bad usage, bad config, unreadable input) prints one message naming the field and no traceback;
exit 1 (a failure while running) shows the traceback only under ``--debug``.
"""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import run_many, tiny_strategy, write_config

PLUGIN = '''
from bpdq import SOLVERS
from bpdq.solvers import RTN, RTNOptions


class FlakyOptions(RTNOptions):
    fail: bool = False


@SOLVERS.register("flaky-rtn")
class FlakyRTN(RTN):
    """RTN that raises while solving when told to (a failure while running)."""

    Options = FlakyOptions

    def _solve(self, W, H, grid, group_size):
        if self.options.fail:
            raise RuntimeError("flaky-rtn was told to fail")
        return super()._solve(W, H, grid, group_size)
'''


@pytest.mark.parametrize("command", [[], ["quantize"], ["eval"], ["inspect"], ["generate"]])
def test_every_command_has_help(in_process, capsys, command):
    with pytest.raises(SystemExit) as info:
        in_process([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: bpdq {' '.join(command)}".rstrip())
    if command:
        assert "--debug" in out and "--plugin" in out


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory, tiny_model_dir):
    """The error paths of the issue, each a real subprocess (run concurrently)."""
    d = tmp_path_factory.mktemp("errors")
    empty = d / "empty.txt"
    empty.write_text("  \n")
    busy = d / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("something")

    def config(name, **changes):
        changes.setdefault("output", str(d / f"out-{name}"))
        return str(write_config(d / f"{name}.yaml", tiny_strategy(tiny_model_dir, **changes)))

    quantize = tiny_strategy(tiny_model_dir)["quantize"]
    cases = {
        "unknown key": ["quantize", config("unknown", quantize={**quantize, "gruop_size": 32})],
        "bad value": ["quantize", config("bad", quantize={**quantize, "grid": {"type": "bitplane", "planes": 9}})],
        "missing file": ["quantize", str(d / "no-such-config.yaml")],
        "empty text": ["quantize", config("empty", calibration={"text": str(empty)},
                                          quantize={**quantize, "solver": {"type": "gptq"}})],  # RTN reads no text
        "unknown plugin": ["quantize", config("plugin"), "--plugin", "no_such_bpdq_plugin"],
        "unknown solver": ["quantize", config("solver", quantize={**quantize, "solver": {"type": "flaky-rtn"}})],
        "existing output": ["quantize", config("busy", output=str(busy))],
    }
    return run_many(cases)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown key", ["quantize.gruop_size: unknown key (allowed: group_size, grid, solver, kernel)"]),
        ("bad value", ["quantize.grid.planes: 9 is not in 1..8"]),
        ("missing file", ["no-such-config.yaml", "does not exist"]),
        ("empty text", ["calibration.text", "empty.txt", "empty"]),
        ("unknown plugin", ["--plugin no_such_bpdq_plugin", "no module named"]),
        ("unknown solver", ["quantize.solver.type: 'flaky-rtn' is not a registered solver (known: ", "rtn"]),
        ("existing output", ["busy", "is not empty", "--overwrite"]),
    ],
)
def test_error_paths_exit_2_with_a_message_naming_the_field(error_runs, case, expected):
    proc = error_runs[case]
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("bpdq quantize: error: ")
    for text in expected:
        assert text in proc.stderr


def test_the_existing_output_is_left_untouched(error_runs, tmp_path_factory):
    assert error_runs["existing output"].returncode == 2
    busy = next(tmp_path_factory.getbasetemp().glob("errors*/busy"))
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["quantize", "--bits", "9"], "--bits: must be 1..8"),
        (["eval", "x"], "the following arguments are required: --text"),
        (["eval", "x", "--text", "t.txt", "--seq-len", "0"], "0 is not a positive integer"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2(in_process, capsys, argv, expected):
    with pytest.raises(SystemExit) as info:
        in_process(argv)
    assert info.value.code == 2
    assert expected in capsys.readouterr().err


def test_more_usage_errors_in_process(in_process, capsys, tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "s.yaml", tiny_strategy(tiny_model_dir))
    cases = [
        (["quantize", str(cfg)], "no output directory: set `output:` in the config or pass --output DIR"),
        (["quantize", str(cfg), "-o", str(tmp_path / "o"), "--set", "quantize.group_size=100"],
         "quantize.group_size: 100 is not allowed"),
        (["quantize", str(cfg), "-o", str(tmp_path / "o"), "--set", "device=cuda:7"], "device: "),
        (["quantize", str(cfg), "-o", str(tmp_path / "o"), "--set", "calibration.text=builtin:nope", "--set",
          "quantize.solver=gptq"],
         "calibration.text: unknown built-in text 'builtin:nope'; known: builtin:python-docs"),
        (["eval", str(tiny_model_dir), "--text", str(tmp_path / "none.txt")], "--text: calibration text"),
        (["inspect", str(tmp_path)], "is not a bpdq checkpoint: config.json is missing"),
        (["inspect", str(tmp_path / "nowhere")], "is not a directory"),
        (["generate", str(tmp_path / "nowhere"), "--prompt", "hi"], "is not a directory"),
        (["quantize", str(cfg), "--plugin", str(tmp_path / "missing.py")], "--plugin"),
    ]
    for argv, expected in cases:
        assert in_process(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err, (argv, err)
        assert "Traceback" not in err


@pytest.fixture(scope="module")
def plugin_runs(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("plugin")
    (d / "flaky_plugin.py").write_text(PLUGIN)
    solver = {"group_size": 32, "grid": {"type": "bitplane", "planes": 2}}

    def config(name, fail):
        q = {**solver, "solver": {"type": "flaky-rtn", "fail": fail, "refits": 1}}
        return str(write_config(d / f"{name}.yaml", tiny_strategy(tiny_model_dir, d / f"out-{name}", quantize=q)))

    cases = {
        "ok": ["quantize", config("ok", False), "--plugin", "flaky_plugin", "--json"],
        "fail": ["quantize", config("fail", True), "--plugin", "flaky_plugin"],
        "fail debug": ["quantize", config("debug", True), "--plugin", "flaky_plugin", "--debug"],
        "bad option": ["quantize", config("bad", "sometimes"), "--plugin", "flaky_plugin"],
    }
    return d, run_many(cases, extra_path=d)


def test_a_solver_registered_by_a_plugin_works_from_a_config(plugin_runs):
    d, runs = plugin_runs
    summary = json.loads(runs["ok"].stdout)
    assert runs["ok"].returncode == 0 and summary["modules_quantized"] == 13
    config = json.loads((d / "out-ok" / "config.json").read_text())
    solvers = {m["solver"]["type"] for m in config["quantization_config"]["modules"].values()}
    assert solvers == {"flaky-rtn"}


def test_a_plugin_solver_option_is_validated_by_its_own_model(plugin_runs):
    proc = plugin_runs[1]["bad option"]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "quantize.solver.fail: 'sometimes' is not true or false" in proc.stderr


def test_a_failure_while_running_exits_1_with_the_traceback_only_under_debug(plugin_runs):
    d, runs = plugin_runs
    for name in ("fail", "fail debug"):
        assert runs[name].returncode == 1, runs[name].stderr
        assert "RuntimeError: flaky-rtn was told to fail" in runs[name].stderr
    assert "Traceback" not in runs["fail"].stderr and "--debug" in runs["fail"].stderr
    assert "Traceback (most recent call last)" in runs["fail debug"].stderr
    assert not (d / "out-fail").exists()  # nothing half-written


def test_version(in_process, capsys):
    with pytest.raises(SystemExit) as info:
        in_process(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("bpdq ")
