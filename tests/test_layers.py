"""The lower layers import nothing above them: the format (bits, quantized) needs only torch, grids and
solvers are pure math over the format, and the allocation math needs only the format's bit accounting.

Checked on the source (every ``import`` statement, also inside functions), not by importing: importing any
``bpdq`` module runs ``bpdq/__init__.py``, which loads the whole package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bpdq"

#: Module or folder -> the bpdq modules it may import (a name allows its submodules too).
ALLOWED = {
    "bits.py": (),
    "quantized.py": ("bpdq.bits",),
    "allocation.py": ("bpdq.quantized",),
    "grids": ("bpdq.grids", "bpdq.bits", "bpdq.quantized", "bpdq.options", "bpdq.registry"),
    "solvers": ("bpdq.solvers", "bpdq.grids", "bpdq.bits", "bpdq.quantized", "bpdq.options", "bpdq.registry"),
}


def bpdq_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name == "bpdq" or name.startswith("bpdq.")}


@pytest.mark.parametrize("where", sorted(ALLOWED))
def test_lower_layers_import_nothing_above_them(where):
    root = PACKAGE / where
    files = sorted(root.glob("*.py")) if root.is_dir() else [root]
    allowed = ALLOWED[where]
    for path in files:
        bad = sorted(n for n in bpdq_imports(path) if not any(n == a or n.startswith(a + ".") for a in allowed))
        assert not bad, f"bpdq/{path.relative_to(PACKAGE)} imports {bad}; allowed: {list(allowed)}"
