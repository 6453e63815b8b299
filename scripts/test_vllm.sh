#!/usr/bin/env bash
# Set up .venv-vllm (scripts/setup_vllm.sh: vLLM's CPU build + bpdq) and run the vLLM serving tests
# (tests/serving, marker `vllm`, which the main suite deselects). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm.sh
# vLLM's CPU backend binds its OpenMP threads per rank; the tensor-parallel test sets "0|1" itself.
export HF_HUB_OFFLINE=1
exec .venv-vllm/bin/python -m pytest -q -m "vllm or not vllm" tests/serving "$@"
