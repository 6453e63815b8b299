#!/usr/bin/env bash
# Main job: set up, quantize the built-in SmolLM2-135M to 2 bits with BPDQ (k=2, g=64: 2.75 bits per weight,
# 128 x 512 calibration tokens, 10 iterations), then compare the perplexity of the full-precision model
# (same dtype) and of the checkpoint on a held-out built-in text, in float32. Tens of minutes on 2 CPU cores.
#   CONFIG=configs/other.yaml OUT=runs/other MAX_WINDOWS=32 bash scripts/main.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1  # everything used here ships with the packages
CONFIG=${CONFIG:-configs/smollm2-bpdq-k2.yaml}
OUT=${OUT:-runs/smollm2-bpdq-k2}
EVAL=(--text builtin:python-docs-test --seq-len 512 --max-windows "${MAX_WINDOWS:-16}")
BPDQ=.venv/bin/bpdq

"$BPDQ" quantize "$CONFIG" --output "$OUT" --overwrite
read -r MODEL DTYPE < <(.venv/bin/python -c 'import sys; from bpdq.strategy import load_strategy; s = load_strategy(sys.argv[1]); print(s.model, s.dtype)' "$CONFIG")
FP=$("$BPDQ" eval "$MODEL" "${EVAL[@]}" --dtype "$DTYPE" --json)
QUANT=$("$BPDQ" eval "$OUT" "${EVAL[@]}" --json)
.venv/bin/python - "$FP" "$QUANT" <<'PY'
import json
import sys

fp, quant = (json.loads(arg) for arg in sys.argv[1:])
print(f"perplexity on {fp['text']} ({fp['windows']} windows of {fp['seq_len']} tokens, {fp['dtype']}):")
print(f"  full precision  {fp['model']:<32} {fp['perplexity']:8.3f}")
print(f"  bpdq checkpoint {quant['model']:<32} {quant['perplexity']:8.3f}")
print(f"  ratio quantized / full precision: {quant['perplexity'] / fp['perplexity']:.3f}")
PY
