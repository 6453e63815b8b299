"""The documentation matches the code: every example runs, every config shown validates, every CLI command
shown parses, and the config reference lists every field of the pydantic models with its real default.

- ``docs/examples/*.py`` run as scripts (each registers a plug-in and checks what it demonstrates);
- fenced ``python`` blocks in ``docs/**/*.md`` and ``CONTRIBUTING.md`` run (the blocks of one file share a
  namespace), except excerpts whose first line is ``# from docs/examples/NAME.py`` (those must appear
  verbatim in that file) and blocks another test runs (``RUN_ELSEWHERE``, only compiled here);
- fenced ``yaml`` blocks with a ``model:`` key validate as strategy configs (example plug-ins imported);
- ``bpdq ...`` lines in ``bash`` blocks parse with the CLI's argument parser, and relative links and quoted
  repository paths exist (also in ``README.md`` and ``configs/README.md``);
- ``docs/config.md`` equals what ``scripts/gen_config_docs.py`` generates, and its tables agree with the
  models field by field.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bpdq
from bpdq.config import CalibrationConfig, Recipe, Rule
from bpdq.strategy import Strategy, parse_yaml, strategy_from_dict
from bpdq.tuning import TuningOptions

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("[!_]*.py"))  # _*.py: helpers the examples share
MARKDOWN = sorted(DOCS.rglob("*.md")) + [REPO / "CONTRIBUTING.md"]
#: Other markdown files whose links and ``bpdq`` command lines are checked too (their code is not run here).
LINKED = MARKDOWN + [p for p in (REPO / "README.md", REPO / "configs" / "README.md") if p.is_file()]
REGISTRIES = (bpdq.GRIDS, bpdq.SOLVERS, bpdq.KERNELS, bpdq.ADAPTERS, bpdq.STAGES)
#: Docs whose python blocks need artifacts and are run by another test (with the artifact substituted):
#: here they are only compiled.
RUN_ELSEWHERE = {
    "docs/transformers.md": ("tests/test_hf.py", "def test_docs_example_runs("),
    "docs/serving.md": ("tests/serving/test_vllm.py", "def test_docs_example_runs("),  # in .venv-vllm
}
EXCERPT = re.compile(r"^# from (docs/examples/\w+\.py)\n")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def blocks(path: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text(encoding="utf-8")) if lang == language]


@pytest.fixture
def registrations():
    """Names registered during a test, unregistered afterwards (examples register plug-ins globally)."""
    before = {r.kind: set(r.names()) for r in REGISTRIES}
    added: dict[str, set[str]] = {}
    yield added
    for r in REGISTRIES:
        added[r.kind] = set(r.names()) - before[r.kind]
        for name in added[r.kind]:
            r.unregister(name)


def _new_names(before: dict[str, set[str]]) -> dict[str, set[str]]:
    return {r.kind: set(r.names()) - before[r.kind] for r in REGISTRIES if set(r.names()) - before[r.kind]}


# ---- examples ---------------------------------------------------------------------------------------------


def test_every_guide_has_an_example():
    guides = sorted(p.stem for p in (DOCS / "guides").glob("add-a-*.md"))
    assert guides == ["add-a-grid", "add-a-kernel", "add-a-model", "add-a-solver", "add-a-stage"]
    for guide in guides:
        example = DOCS / "examples" / (guide.replace("add-a-", "add_") + ".py")
        assert example.is_file(), f"{guide}.md has no example {_rel(example)}"
        assert _rel(example) in (DOCS / "guides" / f"{guide}.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path, registrations):
    before = {r.kind: set(r.names()) for r in REGISTRIES}
    out = io.StringIO()
    torch.manual_seed(0)
    with contextlib.redirect_stdout(out):
        runpy.run_path(str(path), run_name="__main__")  # an example raises SystemExit on a failed check
    assert _new_names(before), f"{path.name} registered nothing"
    assert out.getvalue().strip(), f"{path.name} printed nothing"


def test_examples_are_cli_plugins(tmp_path):
    """``bpdq quantize --plugin docs/examples/add_*.py`` uses the examples' grid, solver and kernel from a
    config file, as the guides say."""
    from tests.cli.conftest import run_cli, write_config
    from tests.tiny_models import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "tiny"
    tiny_model("llama", layers=1).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    config = write_config(tmp_path / "clipped.yaml", {
        "model": str(model_dir),
        "calibration": {"text": "builtin:python-docs", "samples": 2, "seq_len": 16},
        "quantize": {"group_size": 32, "grid": {"type": "clipped_uniform", "bits": 3, "clip": 0.8},
                     "solver": {"type": "diag_rtn", "refits": 1}, "kernel": "planewise"},
        "device": "cpu",
    })
    out = tmp_path / "out"
    plugins = [arg for name in ("grid", "solver", "kernel") for arg in ("--plugin", f"docs/examples/add_{name}.py")]
    proc = run_cli("quantize", str(config), "--output", str(out), "--json", *plugins)
    assert proc.returncode == 0, proc.stderr
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert len(modules) == 7  # every linear of the one decoder layer
    for entry in modules.values():
        assert (entry["grid"]["type"], entry["grid"]["clip"], entry["planes"]) == ("clipped_uniform", 0.8, 3)
        assert (entry["solver"], entry["kernel"]) == ({"type": "diag_rtn", "refits": 1}, "planewise")


# ---- markdown -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MARKDOWN, ids=_rel)
def test_python_blocks_run(path, registrations):
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    for i, code in enumerate(blocks(path, "python")):
        excerpt = EXCERPT.match(code)
        if excerpt:
            source = (REPO / excerpt.group(1)).read_text(encoding="utf-8")
            assert code[excerpt.end():] in source, f"{_rel(path)} block {i}: not an excerpt of {excerpt.group(1)}"
            continue
        compiled = compile(code, f"{_rel(path)}[python block {i}]", "exec")
        if _rel(path) in RUN_ELSEWHERE:
            test_file, test_def = RUN_ELSEWHERE[_rel(path)]
            assert test_def in (REPO / test_file).read_text(encoding="utf-8"), f"{test_file} no longer runs it"
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compiled, namespace)  # noqa: S102


@pytest.mark.parametrize("path", MARKDOWN, ids=_rel)
def test_yaml_configs_validate(path, registrations):
    for example in EXAMPLES:  # guides show configs that use the examples' plug-ins
        runpy.run_path(str(example))
    for code in blocks(path, "yaml"):
        data = parse_yaml(code, _rel(path))
        if isinstance(data, dict) and "model" in data:
            strategy_from_dict(data, f"a config in {_rel(path)}")


@pytest.mark.parametrize("path", LINKED, ids=_rel)
def test_cli_commands_parse(path):
    from bpdq.cli import build_parser

    for code in blocks(path, "bash"):
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["bpdq"] and len(words) > 1 and words[1] not in ("--help", "-h", "--version"):
                try:
                    build_parser().parse_args(words[1:])
                except SystemExit as exc:
                    pytest.fail(f"{_rel(path)}: `{line.strip()}` does not parse (exit {exc.code})")


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", LINKED, ids=_rel)
def test_relative_links_exist(path):
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = (path.parent / target.split("#")[0]).resolve()
        assert file.exists(), f"{_rel(path)} links to {target}, which does not exist"


def test_source_paths_named_in_docs_exist():
    """Paths like `bpdq/kernels/triton_gemm.py` or `tests/strategies.py` quoted in the docs exist."""
    for path in LINKED:
        for quoted in re.findall(r"`((?:bpdq|tests|benchmarks|scripts|configs|docs)/[\w./-]+)`", path.read_text()):
            assert (REPO / quoted).exists(), f"{_rel(path)} names `{quoted}`, which does not exist"


def test_config_examples_in_repo_validate():
    from bpdq.strategy import load_strategy

    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs
    for config in configs:
        load_strategy(config)


# ---- config reference -------------------------------------------------------------------------------------


def test_config_reference_is_generated_and_current():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_config_docs.py"), "--check"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


def _tables(text: str) -> dict[str, dict[str, list[str]]]:
    """``{section heading: {field: [type, default, allowed, description]}}`` of docs/config.md."""
    tables: dict[str, dict[str, list[str]]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip().strip("`")
        elif line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            tables.setdefault(heading, {})[cells[0].strip("`")] = cells[1:]
    return tables


def _documented_default(model, name: str, field) -> str:  # noqa: ANN001
    """The default as users get it: validated (and so normalised) when the field says ``validate_default``."""
    value = getattr(model(), name) if field.validate_default else field.get_default(call_default_factory=True)
    return f"`{json.dumps(getattr(value, 'value', value))}`"


@pytest.mark.parametrize(
    "section, model",
    [("Top level", Strategy), ("calibration", CalibrationConfig), ("quantize", Recipe), ("rules", Rule),
     ("tuning", TuningOptions)]
    + [(name, bpdq.GRIDS.get(name).Options) for name in bpdq.GRIDS.names()]
    + [(name, bpdq.SOLVERS.get(name).Options) for name in bpdq.SOLVERS.names()],
)
def test_config_reference_lists_every_field(section, model):
    table = _tables((DOCS / "config.md").read_text(encoding="utf-8")).get(section)
    assert table is not None, f"docs/config.md has no section {section!r}"
    assert list(table) == list(model.model_fields), f"section {section!r} fields differ from {model.__name__}"
    for name, field in model.model_fields.items():
        _type, default, _allowed, description = table[name]
        assert description and description != "-", f"{section}.{name} has no description"
        if field.is_required():
            assert default == "**required**"
        elif default.startswith("`"):
            assert default == _documented_default(model, name, field), f"{section}.{name}: documented default {default}"
        else:
            assert default.startswith("see ["), f"{section}.{name}: default {default!r}"


@pytest.mark.slow
def test_readme_quick_start_runs_on_the_built_in_model(tmp_path):
    """The README's quick start and its transformers loading, as written except for a smaller run: fewer and
    shorter calibration windows, one solver iteration and one decoder layer (the substitutions must apply)."""
    quick, load = blocks(REPO / "README.md", "python")[:2]
    small = {
        '"samples": 128}': '"samples": 2, "seq_len": 32, "text": "builtin:python-docs"}',
        'quantize={"group_size": 64,': 'rules=[{"match": r"model\\.layers\\.0\\..*"}, {"match": ".*", "skip": True}], '
                                       'quantize={"solver": {"type": "bpdq", "iters": 1}, "group_size": 64,',
        '"runs/mine"': repr(str(tmp_path / "mine")),
    }
    for old, new in small.items():
        assert old in quick, f"the README's quick start no longer contains {old!r}: update this test"
        quick = quick.replace(old, new)
    namespace: dict = {}
    exec(compile(quick, "README.md", "exec"), namespace)
    report = namespace["report"]
    assert report.n_quantized == 7 and report.stages == ["fp_stream", "asymmetric"]  # the default: auto
    assert '"runs/mine"' in load
    exec(compile(load.replace('"runs/mine"', repr(str(tmp_path / "mine"))), "README.md", "exec"), namespace)
    loaded = namespace["model"]
    assert sum(isinstance(m, bpdq.QuantLinear) for m in loaded.modules()) == 7
