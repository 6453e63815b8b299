"""``import bpdq`` (bpdq/__init__.py) is light: public names load on first use, nothing heavy at import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import bpdq

HEAVY = ("torch", "transformers", "pydantic", "safetensors")


def _modules_after(code: str) -> dict[str, bool]:
    script = f"import json, sys\n{code}\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_bpdq_and_the_cli_parser_import_nothing_heavy():
    assert _modules_after("import bpdq") == dict.fromkeys(HEAVY, False)
    assert _modules_after("from bpdq.cli import build_parser\nbuild_parser()") == dict.fromkeys(HEAVY, False)


def test_public_names_resolve_to_their_modules():
    from bpdq.checkpoint import load
    from bpdq.registry import GRIDS

    assert bpdq.load is load and bpdq.GRIDS is GRIDS
    assert set(bpdq.__all__) <= set(dir(bpdq))
    assert all(getattr(bpdq, name) is not None for name in bpdq.__all__)
    assert bpdq.grids.BitPlaneGrid is bpdq.BitPlaneGrid  # subpackages too
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bpdq.nope  # noqa: B018


def test_registries_load_their_builtins_on_first_use():
    assert _modules_after("from bpdq.registry import GRIDS, KERNELS\nassert 'bitplane' in GRIDS and 'torch' in KERNELS") == {
        "torch": True, "transformers": False, "pydantic": True, "safetensors": False
    }
