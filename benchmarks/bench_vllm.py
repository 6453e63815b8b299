"""vLLM tokens/s of a bpdq checkpoint vs the same model unquantized (run in .venv-vllm; see benchmarks/README.md).

    .venv-vllm/bin/python benchmarks/bench_vllm.py [--workdir runs/bench-vllm] [--smoke] [--json out.json]

Builds (once, under ``--workdir``) SmolLM2-135M-Instruct as a plain safetensors directory and its bpdq
checkpoint (bit-plane k=2, g=64; RTN, because speed does not depend on the solver), then measures each in
``vllm.LLM`` one after the other: prompt tokens/s (``--batch`` prompts of ``--prompt-len`` tokens, one new
token each) and generation tokens/s (``--batch`` requests generating ``--gen-len`` tokens each after a
``--prompt-len``-token prompt, prompt time excluded by subtracting the prompt-only run). Engine settings are the
defaults except ``--dtype`` (bfloat16 by default on CPU and GPU) and ``max_model_len``; ``--eager`` disables
torch.compile / CUDA graphs; ``--kv-cache-mib`` fixes the KV cache size. ``--smoke`` uses tiny sizes to check that the script works (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("bench_vllm")
RECIPE = {"group_size": 64, "grid": {"type": "bitplane", "planes": 2}, "solver": {"type": "rtn", "refits": 0}}


def build(workdir: Path) -> tuple[Path, Path]:
    """The unquantized model and its k=2 bpdq checkpoint as directories vLLM reads (built once)."""
    import torch
    from transformers import AutoModelForCausalLM

    import bpdq
    from bpdq.models import load_pretrained

    dense, quantized = workdir / "smollm2-135m", workdir / "smollm2-135m-bpdq-k2"
    if not (dense / "config.json").is_file():
        model, tok = load_pretrained("smollm2-135m", dtype="float32")
        model.config.quantization_config = None
        # transformers will not save a model loaded from GGUF: rebuild it from its config and copy the weights
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        fresh.load_state_dict(model.state_dict())
        fresh.save_pretrained(dense)
        tok.save_pretrained(dense)
    if not (quantized / "config.json").is_file():
        model, tok = load_pretrained(str(dense), dtype="float32")
        calibration = {"text": "builtin:python-docs", "samples": 2, "seq_len": 32}
        bpdq.quantize_model(model, tok, recipe=RECIPE, calibration=calibration, device="cpu", progress=False)
        bpdq.save(model, tok, quantized)
    return dense, quantized


def measure(path: Path, args: argparse.Namespace) -> dict[str, float]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=str(path), dtype=args.dtype, max_model_len=args.prompt_len + args.gen_len + 8,
              enforce_eager=args.eager, seed=0, kv_cache_memory_bytes=args.kv_cache_mib * 2**20)
    startup = time.perf_counter() - start
    vocab = llm.get_tokenizer().vocab_size
    prompts = [TokensPrompt(prompt_token_ids=[(7919 * (b + 1) * (i + 3)) % vocab for i in range(args.prompt_len)])
               for b in range(args.batch)]

    def run(max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return time.perf_counter() - t

    run(1)  # warm-up
    prompt_s = min(run(1) for _ in range(args.repeats))
    full_s = min(run(args.gen_len) for _ in range(args.repeats))
    llm.llm_engine.engine_core.shutdown()
    llm = None  # free the engine before the next model (not del: run() closes over the name)
    gc.collect()
    return {
        "startup_s": startup,
        "prompt_tokens_per_s": args.batch * args.prompt_len / prompt_s,
        "generation_tokens_per_s": args.batch * (args.gen_len - 1) / max(full_s - prompt_s, 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-vllm"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--batch", type=int, default=8, help="concurrent requests (default 8)")
    parser.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per request (default 256)")
    parser.add_argument("--gen-len", type=int, default=64, help="generated tokens per request (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best counts")
    parser.add_argument("--kv-cache-mib", type=int, default=1024, help="KV cache size (default 1024 MiB)")
    parser.add_argument("--eager", action="store_true", help="enforce_eager=True (no torch.compile / CUDA graphs)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, measures nothing")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.prompt_len, args.gen_len, args.repeats, args.eager = 1, 16, 4, 1, True
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dense, quantized = build(args.workdir)
    results = {"settings": {k: str(v) for k, v in vars(args).items()}}
    for name, path in (("unquantized", dense), ("bpdq_k2_g64", quantized)):
        results[name] = measure(path, args)
        log.info("%s: %s", name, json.dumps(results[name]))
    for key in ("prompt_tokens_per_s", "generation_tokens_per_s"):
        results[f"{key}_ratio"] = results["bpdq_k2_g64"][key] / results["unquantized"][key]
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
