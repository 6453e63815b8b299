"""``import bpdq`` (and ``bpdq.serving``) never imports vLLM: only vLLM's plugin loader imports bpdq.serving.vllm."""

from __future__ import annotations

import subprocess
import sys


def test_importing_bpdq_does_not_import_vllm():
    code = (
        "import sys, bpdq, bpdq.serving\n"
        "found = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.'))\n"
        "assert not found, found\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
