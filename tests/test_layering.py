"""bpdq's imports point one way: the import graph (deferred imports included, ``TYPE_CHECKING`` blocks left
out) has no cycle, and no module imports one of a higher layer, nor a sibling package of its own layer."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bpdq"

#: The layers, bottom to top. A module may import its own package (acyclically) and any module of a lower
#: layer; packages that share a layer do not import each other (solvers and kernels are independent).
LAYERS: list[dict[str, tuple[str, ...]]] = [
    {"core": ("bpdq.version", "bpdq.registry", "bpdq.validation", "bpdq.options", "bpdq.bits", "bpdq.quantized",
              "bpdq.safetensors_header", "bpdq.shards", "bpdq.devices", "bpdq.report", "bpdq.progress",
              "bpdq.batch", "bpdq.modules")},
    {"grids": ("bpdq.grids",)},
    {"solvers": ("bpdq.solvers", "bpdq.allocation"), "kernels": ("bpdq.kernels",)},
    {"nn": ("bpdq.linear", "bpdq.experts", "bpdq.checkpoint", "bpdq.tuning")},
    {"config": ("bpdq.config", "bpdq.calibration", "bpdq.strategy")},
    {"models": ("bpdq.models",)},
    {"engine": ("bpdq.engine",)},
    {"api": ("bpdq.api", "bpdq.evaluate", "bpdq.export")},
    {"top": ("bpdq", "bpdq._transformers_hook", "bpdq.hf", "bpdq.serving", "bpdq.cli")},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def place(module: str) -> tuple[int, str]:
    """(layer index, group name) of a bpdq module: its longest matching prefix."""
    best: tuple[int, int, str] | None = None
    for index, groups in enumerate(LAYERS):
        for group, prefixes in groups.items():
            for prefix in prefixes:
                if module == prefix or module.startswith(prefix + ".") and prefix != "bpdq":
                    if best is None or len(prefix) > best[0]:
                        best = (len(prefix), index, group)
    assert best is not None, f"{module} is in no layer of LAYERS: add it"
    return best[1], best[2]


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, modules: set[str]) -> set[str]:
    """The bpdq modules ``path`` imports anywhere (functions included), outside ``if TYPE_CHECKING:``."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                root = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*root, base] if base else root)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            targets = []
        for target in targets:
            if target == "bpdq" or target.startswith("bpdq."):
                hit = resolve(target)
                if hit is not None and hit != me:
                    found.add(hit)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def test_every_module_has_a_layer():
    for module in graph():
        place(module)


def test_imports_point_down_the_layers():
    wrong = []
    for module, targets in graph().items():
        layer, group = place(module)
        for target in targets:
            t_layer, t_group = place(target)
            if t_layer > layer or (t_layer == layer and t_group != group):
                wrong.append(f"{module} ({group}) imports {target} ({t_group})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(sorted(wrong))


def test_the_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_check_sees_deferred_imports_and_skips_type_checking_blocks(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bpdq.api import quantize\n"
                      "def f():\n    from bpdq.engine import loop\n")
    modules = {"bpdq.api", "bpdq.engine", "bpdq.engine.loop"}
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "bpdq"
    try:
        (tmp_path / "bpdq").mkdir()
        probe = tmp_path / "bpdq" / "probe.py"
        probe.write_text(source.read_text())
        assert imports(probe, modules) == {"bpdq.engine.loop"}
    finally:
        PACKAGE = saved
