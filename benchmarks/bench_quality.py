"""Quality table of the 2-bit levers: perplexity ratio vs full precision, bpw and quantization time.

Each row is a strategy config (the main job's, ``configs/smollm2-bpdq-k2.yaml``: SmolLM2-135M in float32,
128 x 512 calibration windows of ``builtin:python-docs``) with a few overrides, quantized and evaluated through
the CLI in subprocesses (``bpdq quantize ... --json`` then ``bpdq eval ... --json`` on
``builtin:python-docs-test``, 16 windows of 512 tokens). Every row (and full precision, always evaluated: the
ratios need it) is also scored on a text of another kind, English licence prose: Debian's
``/usr/share/common-licenses`` texts (``LICENSE_FILES``, concatenated into a ``.txt`` in the work directory;
``--cross-text FILE`` another text, ``--cross-text none`` none). Calibration is unchanged (``python-docs``).

    .venv/bin/python benchmarks/bench_quality.py                      # every row (hours on 2 CPU cores)
    .venv/bin/python benchmarks/bench_quality.py --rows bpdq-k2,bpdq-k2-refit --json quality.json
    .venv/bin/python benchmarks/bench_quality.py --quick --rows bpdq-k2   # smoke run: 2 layers, tiny data
    .venv/bin/python benchmarks/bench_quality.py --list
    .venv/bin/python benchmarks/bench_quality.py --plot quality.png --results quality.json   # no run: a picture

The peer rows ``autoround-*`` (AutoRound W2 g64: 50 iterations; its ``default`` recipe's 200; 200 with
``enable_alg_ext``) run ``benchmarks/bench_autoround.py`` in its own venv, ``.venv-autoround``
(``bash scripts/setup_autoround.sh``), on the same calibration windows and evaluation texts; without that venv
they fail with the setup command.

``--plot PNG`` draws perplexity ratio against bits per weight, one panel per evaluation text, from the
``--results`` files earlier runs wrote with ``--json`` (it needs matplotlib: ``pip install 'bpdq[plot]'``).

A row whose lever the pipeline does not run yet fails with a message naming the lever: either the strategy
rejects its key, or the run's summary lacks the lever's entry (``asymmetric``, ``tuning``, ``allocation``).
Other rows still run; the exit status is 1 when any row failed.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "configs" / "smollm2-bpdq-k2.yaml"
EVAL_TEXT = "builtin:python-docs-test"
PRIMARY = "python-docs-test"  # the evaluation text's name in results (the calibration text's held-out split)
CROSS = "licenses"  # the cross-domain text's name in results
LICENSES = Path("/usr/share/common-licenses")  # Debian's base-files: licence texts, on every Debian system
# in this order: the first 16 x 512 tokens cover Apache-2.0, MPL-2.0 and the start of GPL-3
LICENSE_FILES = ("Apache-2.0", "MPL-2.0", "GPL-3", "LGPL-2.1", "GFDL-1.3", "Artistic", "CC0-1.0", "BSD")
TUNING = {"steps": 100, "lr": 1e-3}
TUNING_EVAL = 32  # TuningOptions' default eval_windows (all 16 batches of the main job)

BPDQ_TODAY = {"type": "bpdq", "refit": "none"}  # the paper's algorithm, as before the levers


@dataclass(frozen=True)
class Peer:
    """Another toolkit's row: ``script`` (it prints the row's JSON) run by the Python of its own ``venv``."""

    script: Path
    venv: Path
    setup: str  # the command that builds the venv
    options: tuple[tuple[str, Any], ...] = ()  # the script's options (``--name value``; True: a bare flag)
    full_only: tuple[str, ...] = ()  # options left out with --quick (the script's smoke defaults apply)

    def args(self, quick: bool) -> list[str]:
        out: list[str] = []
        for name, value in self.options:
            if quick and name in self.full_only:
                continue
            out += [f"--{name}"] if value is True else [f"--{name}", str(value)]
        return out


def _autoround(*options: tuple[str, Any]) -> Peer:
    return Peer(ROOT / "benchmarks" / "bench_autoround.py", ROOT / ".venv-autoround", "bash scripts/setup_autoround.sh",
                options, full_only=("iters",))


AUTOROUND = _autoround(("iters", 50))
# AutoRound's `default` recipe: 200 iterations, its learning rate (1/iters) and batch of 8 (bench_autoround's
# other settings); the calibration windows stay bpdq's 128 x 512
AUTOROUND_DEFAULT = _autoround(("iters", 200))
# enable_alg_ext (SignRoundV2) acts only on symmetric int grids in auto-round 0.16.1 (an asymmetric W2 run gets
# the default recipe's wrapper and loss): W2A16's own symmetric scheme, 2.25 bpw
AUTOROUND_ALG_EXT = _autoround(("iters", 200), ("sym", True), ("enable-alg-ext", True))


@dataclass(frozen=True)
class Row:
    name: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into the base strategy
    lever: str | None = None  # key the quantize summary must hold to prove the lever ran
    peer: Peer | None = None  # run by the peer's script instead of bpdq's CLI
    plugin: str | None = None  # a module the CLI imports first (``--plugin``): an experimental stage


def _q(grid: dict[str, Any], solver: dict[str, Any], group_size: int = 64) -> dict[str, Any]:
    return {"quantize": {"group_size": group_size, "grid": grid, "solver": solver}}


def _k(k: int) -> dict[str, Any]:
    return {"type": "bitplane", "planes": k}


def DOWN(group_size: int) -> dict[str, Any]:  # noqa: N802 - reads as a constant in the rows
    """A rule giving every ``mlp.down_proj`` its own group size."""
    return {"match": r"model\.layers\.\d+\.mlp\.down_proj", "group_size": group_size}


GUIDED = {"type": "guided_hessian", "mix": 0.5, "asymmetric": True}

ROWS = [
    Row("bpdq-k2", "today's BPDQ k=2 g=64 (paper algorithm, refit none)", _q(_k(2), BPDQ_TODAY)),
    Row("bpdq-k2-refit", "+ joint full-Hessian refit (lever 1)", _q(_k(2), {"type": "bpdq", "refit": "full"})),
    Row("bpdq-k2-asym", "+ asymmetric calibration (lever 2)", {**_q(_k(2), BPDQ_TODAY), "calibration": {"asymmetric": True}}, "asymmetric"),
    Row("bpdq-k2-defaults", "bpdq solver defaults, symmetric calibration (asymmetric: false)", _q(_k(2), {"type": "bpdq"})),
    Row("bpdq-k2-defaults-asym", "the library defaults (asymmetric calibration: auto)", {**_q(_k(2), {"type": "bpdq"}), "calibration": {"asymmetric": True}}, "asymmetric"),
    Row("bpdq-k2-tuned", "defaults + coefficient tuning (lever 3)", {**_q(_k(2), {"type": "bpdq"}), "tuning": TUNING}, "tuning"),
    Row("bpdq-k2-asym-tuned", "defaults + asymmetric calibration + tuning", {**_q(_k(2), {"type": "bpdq"}), "calibration": {"asymmetric": True}, "tuning": TUNING}, "tuning"),
    # SmolLM2's 576 and 1536 input columns share no group size of 128: g=192 (2.25 bpw) is the largest that
    # divides both, the nearest group size at or below AutoRound W2 g64's 2.28 bpw
    Row("bpdq-k2-g192-tuned", "k=2 g=192 (2.25 bpw) + tuning", {**_q(_k(2), {"type": "bpdq"}, 192), "tuning": TUNING}, "tuning"),
    Row("bpdq-k2-g192-asym", "k=2 g=192 (2.25 bpw) + asymmetric calibration", {**_q(_k(2), {"type": "bpdq"}, 192), "calibration": {"asymmetric": True}}, "asymmetric"),
    Row("bpdq-k2-g192-asym-tuned", "k=2 g=192 (2.25 bpw) + asymmetric calibration + tuning", {**_q(_k(2), {"type": "bpdq"}, 192), "calibration": {"asymmetric": True}, "tuning": TUNING}, "tuning"),
    # mixed group sizes: down_proj (1536 inputs) takes g=128 or g=64, the 576-input linears g=192
    Row("bpdq-k2-g192-down128-asym", "k=2 g=192, down_proj g=128 (2.28 bpw) + asymmetric calibration", {**_q(_k(2), {"type": "bpdq"}, 192), "rules": [DOWN(128)], "calibration": {"asymmetric": True}}, "asymmetric"),
    Row("bpdq-k2-g192-down128-asym-tuned", "k=2 g=192, down_proj g=128 (2.28 bpw) + asymmetric calibration + tuning", {**_q(_k(2), {"type": "bpdq"}, 192), "rules": [DOWN(128)], "calibration": {"asymmetric": True}, "tuning": TUNING}, "tuning"),
    # the output-aware token weights of bpdq/engine/guided.py in asymmetric calibration's sums
    Row("bpdq-k2-g192-down128-guided-asym", "k=2 g=192, down_proj g=128 (2.28 bpw) + guided asymmetric calibration (mix 0.5)", {**_q(_k(2), {"type": "bpdq"}, 192), "rules": [DOWN(128)], "calibration": {"asymmetric": False}, "stages": [GUIDED]}, "asymmetric", plugin="bpdq.engine.guided"),
    Row("bpdq-k2-g192-down128-guided-asym-tuned", "k=2 g=192, down_proj g=128 (2.28 bpw) + guided asymmetric calibration (mix 0.5) + tuning", {**_q(_k(2), {"type": "bpdq"}, 192), "rules": [DOWN(128)], "calibration": {"asymmetric": False}, "stages": [GUIDED], "tuning": TUNING}, "tuning", plugin="bpdq.engine.guided"),
    Row("bpdq-k2-g192-down64-asym", "k=2 g=192, down_proj g=64 (2.375 bpw) + asymmetric calibration", {**_q(_k(2), {"type": "bpdq"}, 192), "rules": [DOWN(64)], "calibration": {"asymmetric": True}}, "asymmetric"),
    Row("bpdq-k2-g192-down64-asym-tuned", "k=2 g=192, down_proj g=64 (2.375 bpw) + asymmetric calibration + tuning", {**_q(_k(2), {"type": "bpdq"}, 192), "rules": [DOWN(64)], "calibration": {"asymmetric": True}, "tuning": TUNING}, "tuning"),
    Row("bpdq-k2-g192-down64-tuned", "k=2 g=192, down_proj g=64 (2.375 bpw) + tuning", {**_q(_k(2), {"type": "bpdq"}, 192), "rules": [DOWN(64)], "tuning": TUNING}, "tuning"),
    Row("bpdq-target-2.75", "defaults + target_bpw 2.75 allocation (lever 4)", {**_q(_k(2), {"type": "bpdq"}), "target_bpw": 2.75}, "allocation"),
    Row("bpdq-k3", "today's BPDQ k=3 g=64 (4.0 bpw)", _q(_k(3), BPDQ_TODAY)),
    Row("bpdq-k3-refit", "k=3 + refit", _q(_k(3), {"type": "bpdq", "refit": "full"})),
    Row("bpdq-k3-asym", "k=3 + asymmetric calibration", {**_q(_k(3), BPDQ_TODAY), "calibration": {"asymmetric": True}}, "asymmetric"),
    Row("bpdq-k3-defaults-asym", "k=3 (4.0 bpw), the library defaults (asymmetric calibration: auto)", {**_q(_k(3), {"type": "bpdq"}), "calibration": {"asymmetric": True}}, "asymmetric"),
    Row("bpdq-k3-tuned", "k=3 defaults + tuning", {**_q(_k(3), {"type": "bpdq"}), "tuning": TUNING}, "tuning"),
    Row("bpdq-k3-asym-tuned", "k=3 defaults + asymmetric calibration + tuning", {**_q(_k(3), {"type": "bpdq"}), "calibration": {"asymmetric": True}, "tuning": TUNING}, "tuning"),
    Row("rtn-3bit", "RTN uniform 3-bit g=64", _q({"type": "uniform", "bits": 3}, {"type": "rtn"})),
    Row("gptq-3bit", "GPTQ uniform 3-bit g=64", _q({"type": "uniform", "bits": 3}, {"type": "gptq"})),
    Row("autoround-w2g64", "peer: AutoRound W2 g64 asym, 50 iters, fp32", peer=AUTOROUND),
    Row("autoround-w2g64-default", "peer: AutoRound W2 g64 asym, default recipe (200 iters), fp32", peer=AUTOROUND_DEFAULT),
    Row("autoround-w2g64-sym-alg-ext", "peer: AutoRound W2 g64 sym, 200 iters + enable_alg_ext, fp32", peer=AUTOROUND_ALG_EXT),
]
ROW_NAMES = [r.name for r in ROWS]

QUICK = {
    "calibration": {"samples": 4, "seq_len": 128},
    "dtype": "float32",  # the GGUF model loads fastest in float32
    # quantize the first decoder layer only
    "rules": [{"match": r"model\.layers\.([1-9]|[1-9][0-9])\..*", "skip": True}],
}
QUICK_SOLVER = {"bpdq": {"iters": 2}}
QUICK_TUNING = {"steps": 2}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of mappings (``over`` wins; lists and scalars are replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def row_strategy(row: Row, quick: bool, tuning: dict[str, Any] | None = None,
                 calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """The row's strategy: the main job's config with the row's overrides; ``tuning`` (e.g. ``{"steps": 16}``)
    is merged into the tuning rows' options last, ``calibration`` (e.g. ``{"autocast": "bfloat16"}``) into
    every row's calibration."""
    base = yaml.safe_load(BASE_CONFIG.read_text(encoding="utf-8"))
    data = merge(base, row.overrides)
    for key in ("grid", "solver"):  # replaced, not merged: another grid or solver type has other options
        data["quantize"][key] = copy.deepcopy(row.overrides["quantize"][key])
    # asymmetric calibration only where the row asks for it, whatever the base config says
    data["calibration"]["asymmetric"] = bool(row.overrides.get("calibration", {}).get("asymmetric", False))
    if quick:
        rules = data.get("rules", [])
        data = merge(data, QUICK)
        data["rules"] = QUICK["rules"] + rules  # the first matching rule wins: layers 1.. are skipped
        data["quantize"]["solver"] = merge(data["quantize"]["solver"], QUICK_SOLVER.get(data["quantize"]["solver"]["type"], {}))
        if "tuning" in data:
            data["tuning"] = merge(data["tuning"], QUICK_TUNING)
    if tuning and "tuning" in data:
        data["tuning"] = merge(data["tuning"], tuning)
    if calibration:
        data["calibration"] = merge(data["calibration"], calibration)
    return data


def _cli(*args: str) -> tuple[dict[str, Any] | None, str, float]:
    """Run ``bpdq ARGS --json``: (parsed JSON or None, stderr tail, wall seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bpdq.cli", *args, "--json"], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode:
        status = (f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0
                  else f"exit status {proc.returncode}")
        return None, f"{status}: {proc.stderr.strip()[-2000:]}", wall
    return json.loads(proc.stdout), "", wall


def write_license_text(path: Path, directory: Path = LICENSES) -> dict[str, Any]:
    """Write ``LICENSE_FILES`` of ``directory``, concatenated, to ``path`` (a ``.txt``); what ``eval_texts``
    records of it (the sha256 tells a changed text)."""
    missing = [name for name in LICENSE_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"the cross-domain text needs {', '.join(str(directory / n) for n in missing)} "
                                "(Debian's base-files); give --cross-text FILE.txt or --cross-text none")
    text = "\n\n".join((directory / name).read_text(encoding="utf-8").strip() for name in LICENSE_FILES) + "\n"
    path.write_text(text, encoding="utf-8")
    return {"spec": str(path), "source": f"{directory}/{{{','.join(LICENSE_FILES)}}}",
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


def eval_texts(cross: str, workdir: Path) -> dict[str, dict[str, Any]]:
    """The evaluation texts by name: ``PRIMARY`` and, unless ``cross`` is ``none``, ``CROSS`` (``licenses``:
    Debian's licence texts, written under ``workdir``; else a ``.txt``/``.jsonl`` file)."""
    texts = {PRIMARY: {"spec": EVAL_TEXT, "source": "pydoc_data/topics.py, held-out topics"}}
    if cross == "none":
        return texts
    if cross == "licenses":
        texts[CROSS] = write_license_text(workdir / "cross-domain-licenses.txt")
    else:
        path = Path(cross).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--cross-text {cross!r} is not a file (nor 'licenses' or 'none')")
        texts[CROSS] = {"spec": str(path), "source": str(path),
                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return texts


def evaluate(model: str, quick: bool, texts: dict[str, dict[str, Any]], dtype: str | None = None,
             ) -> tuple[dict[str, dict[str, Any]] | None, str]:
    """``bpdq eval`` of ``model`` on each text: results by text name, or None and the first error."""
    out = {}
    for name, text in texts.items():
        args = ["eval", model, "--text", text["spec"], "--seq-len", "128" if quick else "512",
                "--max-windows", "2" if quick else "16"]
        if dtype:
            args += ["--dtype", dtype]
        result, err, _ = _cli(*args)
        if result is None:
            return None, f"on {name}: {err}"
        out[name] = result
    return out, ""


def run_peer(row: Row, quick: bool, texts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Run a peer's script in its venv; its JSON result becomes the row (``settings`` kept)."""
    python = row.peer.venv / "bin" / "python"
    if not python.is_file():
        return {"row": row.name, "error": f"{row.peer.venv.name} is missing: run {row.peer.setup}"}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    text_args = [a for name, text in texts.items() for a in ("--text", f"{name}={text['spec']}")]
    start = time.perf_counter()
    proc = subprocess.run([str(python), str(row.peer.script), *(["--quick"] if quick else []), *row.peer.args(quick),
                           *text_args], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode:
        return {"row": row.name, "error": f"{row.peer.script.name} failed: {proc.stderr.strip()[-2000:]}"}
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"row": row.name, "error": f"{row.peer.script.name} printed no JSON result: {proc.stdout.strip()[-2000:]}"}
    by_text = result["perplexity_by_text"]
    return {
        "row": row.name,
        "description": row.description,
        "peer": True,
        "bpw": result["bpw"],
        "perplexity": by_text[PRIMARY],
        "perplexity_by_text": by_text,
        "quantize_time_s": result["quantize_time_s"],
        "quantize_wall_s": wall,
        "settings": result["settings"],
    }


def run_row(row: Row, quick: bool, workdir: Path, tuning: dict[str, Any] | None = None,
            calibration: dict[str, Any] | None = None, texts: dict[str, dict[str, Any]] | None = None,
            ) -> dict[str, Any]:
    texts = texts or {PRIMARY: {"spec": EVAL_TEXT}}
    if row.peer:
        return run_peer(row, quick, texts)
    data = row_strategy(row, quick, tuning, calibration)
    config = workdir / f"{row.name}.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    out = workdir / row.name
    summary, err, wall = _cli("quantize", str(config), "--output", str(out), "--overwrite",
                              *(["--plugin", row.plugin] if row.plugin else []))
    if summary is None:
        hint = f" (lever {row.lever!r} is not wired into the pipeline yet?)" if row.lever and "exit status 2" in err else ""
        return {"row": row.name, "error": f"quantize failed{hint}: {err}"}
    if row.lever and row.lever not in summary:
        return {"row": row.name, "error": f"lever {row.lever!r} is not wired into the pipeline yet: the run's summary "
                f"has no {row.lever!r} entry (the config was accepted, the lever did not run)"}
    results, err = evaluate(str(out), quick, texts)
    if results is None:
        return {"row": row.name, "error": f"eval failed {err}"}
    return {
        "row": row.name,
        "description": row.description + (f" ({_tuning_words(data['tuning'])})" if "tuning" in data else "")
        + (f" (calibration passes: {cast} autocast)" if (cast := data["calibration"].get("autocast", "none")) != "none" else ""),
        "peer": False,
        "bpw": summary["avg_bpw_quantized"],
        "perplexity": results[PRIMARY]["perplexity"],
        "perplexity_by_text": {name: r["perplexity"] for name, r in results.items()},
        "quantize_time_s": summary["time_s"],
        "quantize_wall_s": wall,
        **({row.lever: summary[row.lever]} if row.lever else {}),
    }


def _tuning_words(tuning: dict[str, Any]) -> str:
    autocast = tuning.get("autocast", "none")
    words = f"{tuning['steps']} steps/layer" + (f", {autocast} autocast" if autocast != "none" else "")
    words += f", kept state chosen on {tuning['eval_windows']} batches" if "eval_windows" in tuning else ""
    if tuning.get("learn_planes"):
        words += ", learned planes" + (f" (step {tuning['planes_lr']:g})" if tuning.get("planes_lr") else "")
    return words


def _fp_by_text(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A results file's full-precision evaluations by text name (files from before the cross-domain text hold
    the primary text's only)."""
    return results.get("full_precision_by_text") or {PRIMARY: results["full_precision"]}


def _ppl_by_text(row: dict[str, Any]) -> dict[str, float]:
    return row.get("perplexity_by_text") or {PRIMARY: row["perplexity"]}


def table(fp: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """Markdown table: per evaluation text (``fp``'s, by name) the perplexity and its ratio to full precision."""
    names = list(fp)
    lines = [f"perplexity on {name} ({f['windows']} x {f['seq_len']} tokens, {f['dtype']}); full precision "
             f"{f['perplexity']:.3f}" for name, f in fp.items()]
    head = " | ".join(f"{name} perplexity | {name} ratio" for name in names)
    lines += [f"| row | bpw | {head} | quantize time (s) | description |", "|---|---|" + "---|---|" * len(names) + "---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | " + "| | " * len(names) + f"| | FAILED: {r['error'].splitlines()[-1] if r['error'] else ''} |")
            continue
        ppl = _ppl_by_text(r)
        cells = " | ".join(f"{ppl[n]:.3f} | {ppl[n] / fp[n]['perplexity']:.3f}" if n in ppl else " | " for n in names)
        lines.append(f"| {r['row']} | {r['bpw']:.3f} | {cells} | {r['quantize_time_s']:.0f} | {r['description']} |")
    return "\n".join(lines)


def plot_points(results_files: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """From results files (``--json``), per evaluation text: the rows' ``{row, description, peer, bpw, ratio}``.
    A row measured in several files (same name and description) keeps the last file's figures. Files of a
    ``--quick`` run and of a real run are not mixed."""
    if not results_files:
        raise ValueError("--plot needs at least one --results FILE (a JSON file written by --json)")
    points: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    quick = set()
    peers = {r.name for r in ROWS if r.peer}
    for path in results_files:
        try:
            results = json.loads(Path(path).read_text(encoding="utf-8"))
            fp = _fp_by_text(results)
            rows = results["rows"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a results file written by bench_quality.py --json ({exc!r})") from None
        quick.add(bool(results.get("quick")))
        for r in rows:
            if "error" in r:
                continue
            for name, ppl in _ppl_by_text(r).items():
                if name in fp:
                    points.setdefault(name, {})[(r["row"], r["description"])] = {
                        "row": r["row"], "description": r["description"], "peer": r.get("peer", r["row"] in peers),
                        "bpw": r["bpw"], "ratio": ppl / fp[name]["perplexity"]}
    if len(quick) > 1:
        raise ValueError("the results files mix --quick runs and real runs: plot them separately")
    if not points:
        raise ValueError(f"no finished row in {', '.join(map(str, results_files))}")
    order = [PRIMARY, CROSS]  # the primary text's panel first
    return {name: list(points[name].values()) for name in sorted(points, key=lambda n: (order + [n]).index(n))}


def _point_label(point: dict[str, Any]) -> str:
    """The row's name, with its tuning steps and learned planes when the description gives them."""
    steps = re.search(r"\((\d+) steps/layer", point["description"])
    extra = [f"{steps.group(1)} steps"] if steps else []
    extra += ["learned planes"] if "learned planes" in point["description"] else []
    return point["row"] + (f" ({', '.join(extra)})" if extra else "")


def plot(results_files: list[Path], png: Path) -> dict[str, list[dict[str, Any]]]:
    """Draw perplexity ratio vs bits per weight, one panel per evaluation text, into ``png``; the points."""
    points = plot_points(results_files)
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, an optional extra: pip install 'bpdq[plot]' "
                           "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(6.5 * len(points), 5), squeeze=False)
    for ax, (name, pts) in zip(axes[0], points.items()):
        for peer, marker, color, label in ((False, "o", "tab:blue", "bpdq rows"), (True, "^", "tab:red", "peer toolkits")):
            sel = [p for p in pts if p["peer"] is peer]
            if sel:
                ax.scatter([p["bpw"] for p in sel], [p["ratio"] for p in sel], marker=marker, color=color, label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.margins(x=0.12)  # room for the labels of the outermost points
        ax.autoscale_view()
        # each label beside its point, pushed down (with a line to the point) only as far as the label above it
        # at about the same bpw requires; highest ratio first
        line = 9 * fig.dpi / 72  # one label's height, in pixels
        lowest: dict[float, float] = {}
        for p in sorted(pts, key=lambda q: -q["ratio"]):
            y = ax.transData.transform((p["bpw"], p["ratio"]))[1]
            key = next((k for k in lowest if abs(k - p["bpw"]) < 0.15), p["bpw"])  # labels within 0.15 bpw collide
            at = min(y + 2, lowest.get(key, float("inf")) - line)
            lowest[key] = at
            moved = y + 2 - at > line / 2
            ax.annotate(_point_label(p), (p["bpw"], p["ratio"]), fontsize=6, xytext=(6, at - y), textcoords="offset pixels",
                        va="bottom", arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5} if moved else None)
        ax.set_title(f"{name}", fontsize=10)
        ax.set_xlabel("bits per weight")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("perplexity / full precision")
    fig.suptitle("SmolLM2-135M: perplexity ratio vs bits per weight", fontsize=11)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=130)
    plt.close(fig)
    return points


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROW_NAMES), help=f"comma-separated rows, run in this order (default all): {', '.join(ROW_NAMES)}")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 x 128 calibration, 1 layer, float32, 2 eval windows of 128")
    p.add_argument("--workdir", type=Path, default=None, help="where configs and checkpoints go (default: a temp dir)")
    p.add_argument("--tuning-steps", type=int, default=None,
                   help=f"optimizer steps per layer of the tuning rows (default {TUNING['steps']}; one pass over the "
                   "16 calibration batches is 16)")
    p.add_argument("--tuning-autocast", choices=["none", "bfloat16", "float16", "auto"], default=None,
                   help="forward dtype of the tuning rows' training steps (default: none, float32; bfloat16 is "
                   "several times faster on a CPU with AMX or AVX512-BF16)")
    p.add_argument("--tuning-eval-windows", type=int, default=None,
                   help=f"calibration batches the tuning rows choose their kept state on (default {TUNING_EVAL})")
    p.add_argument("--tuning-learn-planes", action="store_true",
                   help="the tuning rows also learn plane choices (tuning option learn_planes)")
    p.add_argument("--tuning-planes-lr", type=float, default=None,
                   help="step of the plane offsets in grid steps per optimizer step (default: 1 / steps)")
    p.add_argument("--calibration-autocast", choices=["none", "bfloat16", "float16", "auto"], default=None,
                   help="compute dtype of every bpdq row's calibration passes (default: none, float32; bfloat16 "
                   "took 0.75x the time with asymmetric calibration and tuning on a CPU with AMX)")
    p.add_argument("--cross-text", default="licenses", metavar="licenses|none|FILE",
                   help=f"the second, cross-domain evaluation text (default licenses: {LICENSES}'s "
                   f"{', '.join(LICENSE_FILES)}); a .txt/.jsonl file, or none")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="run nothing: draw perplexity ratio vs bpw from the --results files into PNG")
    p.add_argument("--results", type=Path, action="append", default=[], metavar="FILE",
                   help="a results file written by --json (repeatable), for --plot")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    args = p.parse_args(argv)
    if args.list:
        for r in ROWS:
            print(f"{r.name:<{max(map(len, ROW_NAMES))}} {r.description}" + (f"  [needs lever: {r.lever}]" if r.lever else "")
                  + (f"  [own venv: {r.peer.venv.name}]" if r.peer else ""))
        return 0
    if args.plot:
        try:
            points = plot(args.results, args.plot)
        except (ValueError, RuntimeError) as exc:
            p.error(str(exc))
        print(f"wrote {args.plot}: " + ", ".join(f"{len(v)} rows on {k}" for k, v in points.items()))
        return 0
    if args.results:
        p.error("--results is read by --plot only")
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROW_NAMES]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROW_NAMES)}")
    given = (("steps", args.tuning_steps), ("autocast", args.tuning_autocast), ("eval_windows", args.tuning_eval_windows),
             ("learn_planes", args.tuning_learn_planes or None), ("planes_lr", args.tuning_planes_lr))
    tuning = {k: v for k, v in given if v is not None}
    calibration = {"autocast": args.calibration_autocast} if args.calibration_autocast else None
    base = yaml.safe_load(BASE_CONFIG.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="bpdq-quality-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            texts = eval_texts(args.cross_text, workdir)
        except FileNotFoundError as exc:
            p.error(str(exc))
        fp, err = evaluate(base["model"], args.quick, texts, "float32" if args.quick else base.get("dtype"))
        if fp is None:
            print(f"full-precision eval failed {err}", file=sys.stderr)
            return 1
        results: list[dict[str, Any]] = []
        by_name = {r.name: r for r in ROWS}
        for row in (by_name[n] for n in names):  # in the order asked for
            print(f"running {row.name}: {row.description}", file=sys.stderr, flush=True)
            results.append(run_row(row, args.quick, workdir, tuning, calibration, texts))
            if "error" in results[-1]:
                print(f"  {row.name} failed: {results[-1]['error']}", file=sys.stderr)
            else:
                print(table(fp, results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
            if args.json:  # after every row: a long run that is stopped keeps the rows it finished
                args.json.write_text(json.dumps({"full_precision": fp[PRIMARY], "full_precision_by_text": fp,
                                                 "eval_texts": texts, "rows": results, "quick": args.quick},
                                                indent=2) + "\n")
    print(table(fp, results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
