"""Memory and time per stage of quantizing one decoder layer at Llama-3-8B and Llama-3-70B widths, against the
analytic budgets of docs/scaling.md; and the offload check.

**Layer mode** (default). A synthetic bf16 model directory of *one* decoder layer per shape (random weights, the
real vocabulary unless ``--vocab``): ``8b`` (hidden 4096, intermediate 14336, 32/8 heads) and ``70b`` (8192, 28672,
64/8). Each recipe (``gptq``: uniform 2-bit GPTQ; ``bpdq``: BPDQ k=2, 1 iteration, the refit on; ``bpdq-asym``: +
asymmetric calibration; ``bpdq-tune``: + coefficient tuning; on request ``gptq-asym`` and ``bpdq-tune-planes``,
tuning that learns the planes) runs in its own process, whose RSS a thread samples every 2 ms; the run's stages are
marked by wrapping the engine's functions (capture, Hessians per group, solve per linear, the layer's outputs,
tuning, write, finish). The table gives, per stage, its seconds and its peak RSS above the process's RSS before the
run (imports done), against the stage's analytic budget (:func:`budgets`, the formulas of docs/scaling.md); then the
run's peak RSS (the kernel's ``VmHWM``). Targets: every recipe of the 70B-shaped layer under 20 GB of peak RSS, each
stage within 1.15x its budget; asymmetric calibration at most 1.3x the symmetric run's peak RSS (``--compare``).

**Offload mode** (``--offload``): a hidden-1024 two-layer bf16 model, GPTQ 2-bit with ``offload: 32MB``, its
peak RSS with ``--big`` (default 256) and ``--small`` (32) windows of 512 tokens; target: the growth is at
most 25% of the big run's hidden-state bytes (``windows x 512 x 1024 x 2``).

    python benchmarks/bench_scale.py                                   # 8b and 70b, all four recipes (hours)
    python benchmarks/bench_scale.py --shapes 8b --recipes gptq,gptq-asym --samples 8 --seq-len 256 --compare
    python benchmarks/bench_scale.py --offload                         # the offload growth check
    python benchmarks/bench_scale.py --quick                           # smoke: tiny shapes, every mode (a minute)

One thread per process unless ``OMP_NUM_THREADS`` says otherwise. Memory figures are what this script is for;
seconds mean something only on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int = 128256
    layers: int = 1

    @property
    def kv(self) -> int:
        return self.hidden // self.heads * self.kv_heads


SHAPES = {
    "8b": Shape(4096, 14336, 32, 8),
    "70b": Shape(8192, 28672, 64, 8),
    "tiny": Shape(256, 704, 4, 2, vocab=512),
}
OFFLOAD_SHAPE = Shape(1024, 2816, 8, 2, vocab=32000, layers=2)
OFFLOAD_QUICK = Shape(128, 384, 4, 2, vocab=512, layers=2)

BPDQ = {"grid": {"type": "bitplane", "planes": 2}, "solver": {"type": "bpdq", "iters": 1}}  # refit: the default (full)
GPTQ = {"grid": {"type": "uniform", "bits": 2}, "solver": "gptq"}
RECIPES: dict[str, dict[str, Any]] = {
    "gptq": {"recipe": GPTQ},
    "bpdq": {"recipe": BPDQ},
    "bpdq-asym": {"recipe": BPDQ, "asymmetric": True},
    "bpdq-tune": {"recipe": BPDQ, "tuning": {"steps": 8}},
    "bpdq-tune-planes": {"recipe": BPDQ, "tuning": {"steps": 8, "learn_planes": True}},
    "gptq-asym": {"recipe": GPTQ, "asymmetric": True},
}
DEFAULT_RECIPES = "gptq,bpdq,bpdq-asym,bpdq-tune"
RUNTIME = 0.3e9  # bytes a run holds above its start whatever the widths (measured: 0.25-0.35 GB)


# ---- the model directories -------------------------------------------------------------------------------

def write_model(directory: Path, shape: Shape) -> int:
    """A random bf16 Llama of ``shape`` written shard by shard (never whole in memory); returns its bytes."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from bpdq.checkpoint import unique_state_dict
    from bpdq.shards import ShardWriter

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    directory.mkdir(parents=True)
    writer = ShardWriter(directory, "2GB")
    gen = torch.Generator().manual_seed(0)
    units: dict[str, dict[str, torch.Tensor]] = {}  # a decoder layer each, then the rest
    for name, meta in unique_state_dict(skeleton).items():
        units.setdefault(name.split(".")[2] if name.startswith("model.layers.") else "rest", {})[name] = meta
    total = 0
    for unit in units.values():
        for name, meta in unit.items():  # one tensor at a time
            writer.add({name: torch.ones(meta.shape, dtype=torch.bfloat16) if name.endswith("norm.weight")
                        else (torch.randn(meta.shape, generator=gen) * 0.02).to(torch.bfloat16)})
            total += meta.numel() * 2
    writer.close()
    config.save_pretrained(directory)
    return total


def model_dir(work: Path, name: str, shape: Shape) -> Path:
    path = work / f"model-{name}-{shape.hidden}x{shape.intermediate}-v{shape.vocab}-l{shape.layers}"
    if not (path / "config.json").is_file():
        write_model(path, shape)
    return path


# ---- one run, in its own process ------------------------------------------------------------------------

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))


class StageMeter:
    """Peak RSS and seconds per named stage: a thread samples the RSS every ``interval`` seconds into the
    innermost open stage (and each stage samples at its start and end, so short stages count too)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.base = _rss()
        self.records: list[tuple[str, float, int]] = []  # (stage, seconds, peak RSS)
        self._stack: list[list[int]] = []  # per open stage: [peak]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            rss = _rss()
            with self._lock:
                if self._stack:
                    self._stack[-1][0] = max(self._stack[-1][0], rss)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        cell = [_rss()]
        with self._lock:
            self._stack.append(cell)
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            with self._lock:
                self._stack.pop()
                peak = max(cell[0], _rss())
                if self._stack:  # the enclosing stage saw this peak too
                    self._stack[-1][0] = max(self._stack[-1][0], peak)
            self.records.append((name, seconds, peak))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _instrument(meter: StageMeter) -> None:
    """Wrap the engine's functions so that each call is a stage of ``meter``."""
    import bpdq.engine.loop as loop
    import bpdq.engine.quality as quality
    from bpdq.engine.sink import CheckpointSink

    def wrap(owner: Any, attr: str, label: Any) -> None:
        inner = getattr(owner, attr)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with meter.stage(label(*args, **kwargs) if callable(label) else label):
                return inner(*args, **kwargs)

        setattr(owner, attr, wrapped)

    wrap(loop, "capture_layer_inputs", "capture")
    wrap(loop, "collect_hessians", lambda layer, names, *a, **k: f"hessians {'+'.join(_short(n) for n in names)}")
    wrap(quality.AsymmetricCalibration, "hessians",
         lambda stage, step, names, *a, **k: f"hessians {'+'.join(_short(n) for n in names)}")
    wrap(loop, "quantize_linear", lambda root, rel, *a, **k: f"solve {_short(rel)}")
    wrap(loop, "run_layer", "outputs")
    wrap(quality, "run_layer", "fp outputs")
    wrap(quality.CoefficientTuning, "after_solve", "tuning")
    wrap(CheckpointSink, "write_layer", "write")
    wrap(CheckpointSink, "finish", "finish")


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def run_one(model: str, recipe: str, output: str, samples: int, seq_len: int, offload: str | None) -> dict[str, Any]:
    import torch

    import bpdq

    torch.manual_seed(0)
    ids = [torch.randint(0, 256, (seq_len,), generator=torch.Generator().manual_seed(i)) for i in range(samples)]
    spec = RECIPES[recipe]
    meter = StageMeter()
    _instrument(meter)
    start = time.perf_counter()
    with meter.stage("run"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # quantize_model: token-id windows as given
        bpdq.quantize_model(model, recipe={"group_size": 64, **spec["recipe"]}, calibration=ids, device="cpu",
                            progress=False, output=output, overwrite=True, asymmetric=spec.get("asymmetric", False),
                            tuning=spec.get("tuning"), offload=offload)
    elapsed = time.perf_counter() - start
    meter.close()
    return {"base": meter.base, "seconds": elapsed, "peak_rss": _hwm(), "stages": meter.records}


def launch(model: Path, recipe: str, output: Path, samples: int, seq_len: int, offload: str | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--run", str(model), recipe, str(output), "--samples", str(samples),
           "--seq-len", str(seq_len)]
    if offload:
        cmd += ["--run-offload", offload]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode:
        sys.exit(f"{recipe} on {model.name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the analytic budgets (docs/scaling.md, "Memory per stage") ------------------------------------------

def budgets(shape: Shape, recipe: str, tokens: int, batch_tokens: int) -> dict[str, float]:
    """Bytes above the process's RSS before the run, per stage, for one decoder layer of ``shape`` (bf16 weights
    and activations, ``tokens`` calibration tokens in batches of ``batch_tokens``). Notation of docs/scaling.md:
    ``d`` hidden, ``f`` intermediate, ``d_kv``, ``V``, ``T`` tokens, ``b`` tokens per batch, ``w = a = 2``."""
    d, f, kv, V, T, b = shape.hidden, shape.intermediate, shape.kv, shape.vocab, tokens, batch_tokens
    w = a = 2
    spec = RECIPES[recipe]
    fp = spec.get("asymmetric", False) or spec.get("tuning") is not None  # the full-precision stream
    streams = 2 if fp else 1
    layer = (2 * d * d + 2 * d * kv + 3 * d * f) * w
    layers = layer * (2 if fp else 1)  # the layer in work, and its full-precision copy
    stream = a * d * T  # one hidden-state stream
    embed = V * d * w
    # a batch's forward through the layer, in float32 where the calibration computes (MLP: gate, up, act)
    batch = 4 * b * (3 * f + 4 * d)
    # activations: each stream's inputs, its recorded attention outputs (replay), the next layer's outputs
    held = streams * 3 * stream
    linears = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
               "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    groups = {"q_proj+k_proj+v_proj": d, "o_proj": d, "gate_proj+up_proj": d, "down_proj": f}
    run = RUNTIME  # what the run itself holds whatever the widths (the model skeleton, allocator and torch caches)
    out: dict[str, float] = {"capture": run + 2 * embed + stream + batch}  # embeddings and head (untied) are read
    for name, n in groups.items():
        # the float64 upper triangle 4 n^2 + the float32 Hessian 4 n^2 handed out
        out[f"hessians {name}"] = run + layers + held + 8 * n * n + batch
        if spec.get("asymmetric"):
            corrections = 4 * sum(linears[x][0] for x in name.split("+")) * n  # W D per linear, float32
            if name == "down_proj":  # P (float64) beside the upper triangle; then, the fp copy dropped, the
                # correction in P's storage, H_q and its working copy
                out[f"hessians {name}"] = run + held + max(layers + 4 * n * n + 8 * d * n + batch,
                                                           layer + 8 * n * n + corrections)
            else:  # D (float64) beside the upper triangle and the corrections; then H_q and its working copy
                out[f"hessians {name}"] = run + layers + held + 12 * n * n + corrections + batch
    for name, (rows, n) in linears.items():
        solver = 3 * 4 * rows * n  # float32 copies of the weight: W, Q, the errors
        if recipe.startswith("bpdq"):
            solver += 3 * 64 * 2**20  # the refit's work buffers (a chunk of 64 MiB, its Gram blocks and solve)
        copy = layer if spec.get("asymmetric") and name == "down_proj" else layers  # the fp copy is dropped by then
        out[f"solve {name}"] = run + copy + held + 8 * n * n + solver  # H and U (float32)
    out["outputs"] = run + (layer if spec.get("asymmetric") else layers) + held + batch
    if fp:
        out["fp outputs"] = run + layers + held + batch
    if spec.get("tuning") is not None:
        out["tuning"] = run + layers + held + 4 * layer + 4 * batch  # float32 dense weights and their autograd
        if spec["tuning"].get("learn_planes"):
            # per weight an int16 offset and the int8 sign of its gradient (1.5 L), and the plane search's float32
            # work (2 L: the 8B-shaped layer's tuning peak grew by 3.4 L)
            out["tuning"] += 3.5 * layer
    packed = sum(r * n for r, n in linears.values()) * (2 + 16 * 3 / 64) / 8
    out["write"] = run + layer + held + packed
    out["finish"] = run + 2 * embed + packed
    return out


# ---- reports --------------------------------------------------------------------------------------------

def stage_table(result: dict[str, Any], budget: dict[str, float]) -> list[str]:
    base = result["base"]
    merged: dict[str, list[float]] = {}
    for name, seconds, peak in result["stages"]:
        if name == "run":
            continue
        entry = merged.setdefault(name, [0.0, 0.0])
        entry[0] += seconds
        entry[1] = max(entry[1], peak - base)
    lines = ["| stage | s | peak RSS above start, GB | budget, GB | ratio |", "|---|---|---|---|---|"]
    for name, (seconds, peak) in merged.items():
        want = budget.get(name)
        ratio = f"{peak / want:.2f}" if want else "-"
        lines.append(f"| {name} | {seconds:.1f} | {peak / GB:.3f} | {want / GB if want else float('nan'):.3f} | {ratio} |")
    return lines


def layer_mode(args: argparse.Namespace, work: Path) -> None:
    shapes = [s for s in args.shapes.split(",")]
    recipes = args.recipes.split(",")
    peaks: dict[tuple[str, str], int] = {}
    for name in shapes:
        shape = SHAPES[name] if args.vocab is None else dataclasses.replace(SHAPES[name], vocab=args.vocab)
        directory = model_dir(work, name, shape)
        tokens, batch_tokens = args.samples * args.seq_len, min(args.samples, 8) * args.seq_len
        for recipe in recipes:
            result = launch(directory, recipe, work / f"out-{name}-{recipe}", args.samples, args.seq_len)
            peaks[(name, recipe)] = result["peak_rss"]
            print(f"\n### {name}-shaped layer ({shape.hidden} / {shape.intermediate}, vocabulary {shape.vocab}), "
                  f"{recipe}, {args.samples} x {args.seq_len} tokens: peak RSS {result['peak_rss'] / GB:.2f} GB "
                  f"(start {result['base'] / GB:.2f} GB), {result['seconds']:.0f} s\n")
            print("\n".join(stage_table(result, budgets(shape, recipe, tokens, batch_tokens))), flush=True)
    if args.compare:
        print()
        for name in shapes:
            for sym, asym in (("gptq", "gptq-asym"), ("bpdq", "bpdq-asym")):
                if (name, sym) in peaks and (name, asym) in peaks:
                    ratio = peaks[(name, asym)] / peaks[(name, sym)]
                    print(f"{name}: peak RSS {asym} / {sym} = {peaks[(name, asym)] / GB:.2f} / "
                          f"{peaks[(name, sym)] / GB:.2f} GB = {ratio:.2f}x (target <= 1.3)")


def offload_mode(args: argparse.Namespace, work: Path, shape: Shape, seq_len: int) -> None:
    directory = model_dir(work, "offload", shape)
    runs = {}
    for windows in (args.small, args.big):
        runs[windows] = launch(directory, "gptq", work / f"out-offload-{windows}", windows, seq_len, args.offload_size)
    hidden_bytes = args.big * seq_len * shape.hidden * 2
    growth = runs[args.big]["peak_rss"] - runs[args.small]["peak_rss"]
    print(f"\n### offload {args.offload_size}: hidden {shape.hidden}, {shape.layers} layers, GPTQ 2-bit\n")
    print("| windows x tokens | peak RSS GB |\n|---|---|")
    for windows, r in runs.items():
        print(f"| {windows} x {seq_len} | {r['peak_rss'] / GB:.3f} |")
    print(f"\ngrowth {growth / 1e6:+.0f} MB for {args.big} x {seq_len} tokens' hidden states of {hidden_bytes / 1e6:.0f} MB: "
          f"{growth / hidden_bytes:.0%} (target <= 25%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8b,70b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the real one, 128256)")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--compare", action="store_true", help="print asymmetric / symmetric peak RSS ratios")
    parser.add_argument("--offload", action="store_true", help="the offload growth check instead of the layer mode")
    parser.add_argument("--offload-size", default="32MB")
    parser.add_argument("--small", type=int, default=32, help="offload mode: windows of the small run")
    parser.add_argument("--big", type=int, default=256, help="offload mode: windows of the big run")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, every recipe, both modes")
    parser.add_argument("--workdir", default=None, help="where models and checkpoints go (default: a temp dir)")
    parser.add_argument("--run", nargs=3, metavar=("MODEL_DIR", "RECIPE", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--run-offload", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(*args.run, args.samples, args.seq_len, args.run_offload)))
        return
    for name in args.shapes.split(","):
        if name not in SHAPES:
            parser.error(f"--shapes: unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    for name in args.recipes.split(","):
        if name not in RECIPES:
            parser.error(f"--recipes: unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bpdq-bench-scale-"))
    if args.quick:
        args.shapes, args.recipes, args.samples, args.seq_len, args.compare = "tiny", ",".join(RECIPES), 4, 64, True
        args.small, args.big, args.offload_size = 2, 8, "64KB"
        layer_mode(args, work)
        offload_mode(args, work, OFFLOAD_QUICK, 64)
    elif args.offload:
        offload_mode(args, work, OFFLOAD_SHAPE, 512)
    else:
        layer_mode(args, work)


if __name__ == "__main__":
    main()
