#!/usr/bin/env bash
# Create ./.venv (if missing) and install bpdq with its test and plot extras and the built-in offline model.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
make_venv .venv
# The library accepts torch>=2.6; this script pins torch==2.13.0 (a CPU build, the version CI tests): an
# unpinned torch would pull gigabytes of CUDA packages.
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test,plot]"
install_builtin_model .venv
