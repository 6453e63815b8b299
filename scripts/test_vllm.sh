#!/usr/bin/env bash
# Set up .venv-vllm (scripts/setup_vllm.sh: vLLM's CPU build + bpdq, transformers 5.16.1) and run the vLLM
# serving tests (tests/serving, marker `vllm`, which the main suite deselects), plus the tests of bpdq's
# transformers integration and adapters, which the main suite runs with the newest transformers.
# Extra arguments go to pytest (after those paths).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm.sh
# vLLM's CPU backend binds its OpenMP threads per rank; the tensor-parallel test sets "0|1" itself.
export HF_HUB_OFFLINE=1
TESTS=(tests/serving tests/test_hf.py tests/test_transformers_hook.py tests/models)
exec .venv-vllm/bin/python -m pytest -q -m "vllm or not vllm" "${TESTS[@]}" "$@"
