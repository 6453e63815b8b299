"""benchmarks/bench_quality.py builds a valid strategy config for every row (its rows take hours: a config
error must not wait for the run to surface)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from bpdq.strategy.model import strategy_from_dict

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "benchmarks" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


BENCH = _bench()


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
@pytest.mark.parametrize("row", [r for r in BENCH.ROWS if r.peer is None], ids=lambda r: r.name)
def test_every_row_is_a_valid_strategy_with_the_rows_own_grid_and_solver(row, quick):
    if row.plugin:  # an experimental stage's module registers it, as the CLI's --plugin does
        importlib.import_module(row.plugin)
    data = BENCH.row_strategy(row, quick)
    strategy = strategy_from_dict(data, row.name)
    want = row.overrides["quantize"]
    # the row's grid and solver replace the base config's (another type has other options)
    assert data["quantize"]["grid"] == want["grid"]
    assert strategy.quantize.group_size == want["group_size"]
    assert strategy.calibration.asymmetric == row.overrides.get("calibration", {}).get("asymmetric", False)
    if not quick:
        assert data["quantize"]["solver"] == want["solver"]
    # a row's own rules (e.g. down_proj's group size) are kept, after the quick mode's skip rule
    own = [r["match"] for r in row.overrides.get("rules", [])]
    assert [r.match for r in strategy.rules][len(strategy.rules) - len(own):] == own


def test_tuning_overrides_reach_only_the_tuning_rows():
    rows = {r.name: r for r in BENCH.ROWS}
    tuned = BENCH.row_strategy(rows["bpdq-k2-g192-down64-asym-tuned"], False, {"steps": 48, "autocast": "bfloat16"})
    assert tuned["tuning"] == {**BENCH.TUNING, "steps": 48, "autocast": "bfloat16"}
    assert strategy_from_dict(tuned, "tuned").tuning.autocast == "bfloat16"
    assert "tuning" not in BENCH.row_strategy(rows["bpdq-k2-g192-down64-asym"], False, {"steps": 48})


def test_calibration_overrides_reach_every_row_and_keep_its_asymmetric_flag():
    rows = {r.name: r for r in BENCH.ROWS}
    for name, asym in (("bpdq-k2-g192-down64-asym", True), ("bpdq-k2", False)):
        data = BENCH.row_strategy(rows[name], False, None, {"autocast": "bfloat16"})
        assert data["calibration"]["autocast"] == "bfloat16" and data["calibration"]["asymmetric"] is asym
        assert strategy_from_dict(data, name).calibration.autocast == "bfloat16"
    assert "autocast" not in BENCH.row_strategy(rows["bpdq-k2"], False)["calibration"]


# ---- peers, the cross-domain text and the plot --------------------------------------------------------------


def test_autoround_rows_pass_their_settings_and_quick_keeps_the_smoke_iterations():
    rows = {r.name: r for r in BENCH.ROWS}
    default, ext = rows["autoround-w2g64-default"].peer, rows["autoround-w2g64-sym-alg-ext"].peer
    assert default.args(False) == ["--iters", "200"] and default.args(True) == []
    assert ext.args(False) == ["--iters", "200", "--sym", "--enable-alg-ext"]
    assert ext.args(True) == ["--sym", "--enable-alg-ext"]  # bench_autoround's --quick picks 2 iterations
    assert rows["autoround-w2g64"].peer.args(False) == ["--iters", "50"]


def _licenses(directory):
    directory.mkdir()
    for i, name in enumerate(BENCH.LICENSE_FILES):
        (directory / name).write_text(f"  licence {i} of {name}\n", encoding="utf-8")
    return directory


def test_the_cross_domain_text_concatenates_the_licences_in_order(tmp_path):
    info = BENCH.write_license_text(tmp_path / "x.txt", _licenses(tmp_path / "lic"))
    text = (tmp_path / "x.txt").read_text(encoding="utf-8")
    assert text.split("\n\n") == [f"licence {i} of {n}" for i, n in enumerate(BENCH.LICENSE_FILES[:-1])] + [
        f"licence {len(BENCH.LICENSE_FILES) - 1} of {BENCH.LICENSE_FILES[-1]}\n"]
    assert info["spec"] == str(tmp_path / "x.txt") and len(info["sha256"]) == 64
    (tmp_path / "lic" / BENCH.LICENSE_FILES[1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"{BENCH.LICENSE_FILES[1]}.*--cross-text"):
        BENCH.write_license_text(tmp_path / "y.txt", tmp_path / "lic")


def test_eval_texts_none_a_file_or_a_missing_file(tmp_path):
    assert list(BENCH.eval_texts("none", tmp_path)) == [BENCH.PRIMARY]
    own = tmp_path / "own.txt"
    own.write_text("some prose\n", encoding="utf-8")
    texts = BENCH.eval_texts(str(own), tmp_path)
    assert list(texts) == [BENCH.PRIMARY, BENCH.CROSS] and texts[BENCH.CROSS]["spec"] == str(own)
    with pytest.raises(FileNotFoundError, match="not a file"):
        BENCH.eval_texts(str(tmp_path / "absent.txt"), tmp_path)


def _fp(ppl):
    return {"perplexity": ppl, "windows": 16, "seq_len": 512, "dtype": "float32"}


def _results(path, quick=False, rows=None):
    fp = {BENCH.PRIMARY: _fp(10.0), BENCH.CROSS: _fp(20.0)}
    rows = rows if rows is not None else [
        {"row": "bpdq-k2", "description": "a", "peer": False, "bpw": 2.75, "perplexity": 15.0,
         "perplexity_by_text": {BENCH.PRIMARY: 15.0, BENCH.CROSS: 36.0}, "quantize_time_s": 1.0},
        {"row": "autoround-w2g64", "description": "b", "peer": True, "bpw": 2.28125, "perplexity": 18.0,
         "perplexity_by_text": {BENCH.PRIMARY: 18.0, BENCH.CROSS: 40.0}, "quantize_time_s": 2.0},
        {"row": "gptq-3bit", "error": "quantize failed: boom"},
    ]
    path.write_text(json.dumps({"full_precision": fp[BENCH.PRIMARY], "full_precision_by_text": fp, "rows": rows,
                                "quick": quick}), encoding="utf-8")
    return path


def test_table_shows_both_texts_ratios(tmp_path):
    data = json.loads(_results(tmp_path / "r.json").read_text())
    lines = BENCH.table(data["full_precision_by_text"], data["rows"]).splitlines()
    assert "| bpdq-k2 | 2.750 | 15.000 | 1.500 | 36.000 | 1.800 | 1 | a |" in lines
    assert any(line.startswith("| gptq-3bit |") and "FAILED: quantize failed: boom" in line for line in lines)


def test_plot_points_from_results_files(tmp_path):
    points = BENCH.plot_points([_results(tmp_path / "r.json")])
    assert list(points) == [BENCH.PRIMARY, BENCH.CROSS]
    by_row = {p["row"]: p for p in points[BENCH.CROSS]}
    assert by_row["bpdq-k2"]["ratio"] == pytest.approx(1.8) and by_row["bpdq-k2"]["peer"] is False
    assert by_row["autoround-w2g64"]["ratio"] == pytest.approx(2.0) and by_row["autoround-w2g64"]["peer"] is True
    # a file from before the cross-domain text: the primary text only, peers known by their row
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"full_precision": _fp(10.0), "quick": False, "rows": [
        {"row": "autoround-w2g64", "description": "old", "bpw": 2.28, "perplexity": 17.9, "quantize_time_s": 3.0}]}))
    points = BENCH.plot_points([old])
    assert list(points) == [BENCH.PRIMARY] and points[BENCH.PRIMARY][0]["peer"] is True
    assert points[BENCH.PRIMARY][0]["ratio"] == pytest.approx(1.79)


def test_plot_refuses_no_files_mixed_modes_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="at least one --results"):
        BENCH.plot_points([])
    with pytest.raises(ValueError, match="mix --quick"):
        BENCH.plot_points([_results(tmp_path / "a.json"), _results(tmp_path / "b.json", quick=True)])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a results file"):
        BENCH.plot_points([tmp_path / "bad.json"])
    with pytest.raises(ValueError, match="no finished row"):
        BENCH.plot_points([_results(tmp_path / "c.json", rows=[{"row": "x", "error": "e"}])])


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(RuntimeError, match=r"bpdq\[plot\]"):
        BENCH.plot([_results(tmp_path / "r.json")], tmp_path / "q.png")
    assert not (tmp_path / "q.png").exists()


def test_plot_cli_without_results_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        BENCH.main(["--plot", str(tmp_path / "q.png")])
    assert info.value.code == 2 and "--results" in capsys.readouterr().err


def test_plot_writes_a_png_with_a_panel_per_text(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    png = tmp_path / "sub" / "q.png"
    assert BENCH.main(["--plot", str(png), "--results", str(_results(tmp_path / "r.json"))]) == 0
    with Image.open(png) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > 1.8 * height  # two panels side by side
