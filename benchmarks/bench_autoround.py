"""AutoRound W2 on SmolLM2-135M, the 2-bit peer rows of bench_quality.py.

Runs in its own venv (AutoRound pins its own dependencies): ``bash scripts/setup_autoround.sh`` builds
``.venv-autoround``, then

    .venv-autoround/bin/python benchmarks/bench_autoround.py            # the 50-iteration row (tens of minutes)
    .venv-autoround/bin/python benchmarks/bench_autoround.py --iters 200                            # `default` recipe
    .venv-autoround/bin/python benchmarks/bench_autoround.py --iters 200 --sym --enable-alg-ext     # SignRoundV2
    .venv-autoround/bin/python benchmarks/bench_autoround.py --quick    # smoke run: checks the plumbing

Same inputs as bpdq's rows: the model loaded as bpdq's CLI loads it (the main job's config,
``configs/smollm2-bpdq-k2.yaml``: ``smollm2-135m`` in float32), the calibration windows bpdq's pipeline draws
from that config's ``calibration`` block (128 x 512 tokens of ``builtin:python-docs``, seed 0), given to
AutoRound as its dataset (a list of ``[1, seq_len]`` token-id tensors; the ids its calibration pass embeds
are checked to be exactly those windows; as for any token-id dataset, AutoRound leaves each window's last
token and any pad token out of its loss), and bpdq's perplexity on ``builtin:python-docs-test`` (16 windows of
512 tokens; more texts with ``--text NAME=SPEC``, as bench_quality.py passes its cross-domain one) of the
fake-quantized model (AutoRound leaves the dequantized weights in the linears when no
export format is given; each quantized group is checked to hold at most 2**bits distinct values).

AutoRound settings: bits=2, group_size=64, sym=False (``--sym``: True), iters=50 (``--iters``; its `default`
recipe has 200), nsamples=128, seqlen=512, amp=False (fp32 tuning), device_map="cpu", enable_alg_ext=False
(``--enable-alg-ext``: SignRoundV2, checked to be the quantizer that ran), everything else at auto-round
0.16.1's defaults (its `default` recipe's batch of 8 and learning rate 1/iters). bpw is its storage:
``bits``-bit codes plus, per group, one scale in its scale dtype and (asymmetric) one ``bits``-bit zero point.

Prints one JSON object on stdout (all logging goes to stderr): ``{"row", "description", "bpw", "perplexity",
"perplexity_by_text", "quantize_time_s", "settings"}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import yaml

from bench_quality import BASE_CONFIG, EVAL_TEXT, PRIMARY, QUICK

logger = logging.getLogger("bench_autoround")

AUTO_ROUND_VERSION = "0.16.1"
SETUP_HINT = "run scripts/setup_autoround.sh (it builds .venv-autoround) and use .venv-autoround/bin/python"
BITS = 2
ITERS = 50
QUICK_ITERS = 2
EVAL = {"seq_len": 512, "max_windows": 16}  # as bench_quality.evaluate (the CLI's `bpdq eval` arguments)
QUICK_EVAL = {"seq_len": 128, "max_windows": 2}
QUICK_BLOCKS = r"^model\.layers\.0$"  # like bench_quality's --quick: the first decoder layer only


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def import_auto_round() -> Any:
    """``auto_round.AutoRound``, or exit with the setup command."""
    try:
        import auto_round
    except ImportError as exc:
        raise SystemExit(f"auto-round is not importable ({exc}): {SETUP_HINT}") from None
    if auto_round.__version__ != AUTO_ROUND_VERSION:
        raise SystemExit(f"auto-round {auto_round.__version__} is installed, this benchmark pins "
                         f"{AUTO_ROUND_VERSION}: {SETUP_HINT}")
    return auto_round.AutoRound


def storage_bpw(bits: int, group_size: int, sym: bool, scale_bits: int) -> float:
    """Bits per weight of ``bits``-bit codes + one scale (and, asymmetric, one ``bits``-bit zero) per group."""
    return bits + (scale_bits + (0 if sym else bits)) / group_size


def calibration_config(quick: bool) -> dict[str, Any]:
    """The main job's ``calibration`` block (``QUICK``'s smaller windows with ``quick``)."""
    data = yaml.safe_load(BASE_CONFIG.read_text(encoding="utf-8"))
    calibration = dict(data["calibration"])
    if quick:
        calibration.update(QUICK["calibration"])
    return {"model": data["model"], "dtype": data["dtype"], "calibration": calibration}


class EmbeddingRecorder:
    """Records the token ids the model's input embedding sees (what AutoRound actually calibrates on)."""

    def __init__(self, model: Any) -> None:
        self.seen: list[Any] = []
        self.handle = model.get_input_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: tuple[Any, ...]) -> None:
        self.seen.append(args[0].detach().cpu().clone())

    def check(self, windows: list[Any]) -> int:
        """Raise unless the recorded batches, in order, are exactly ``windows``; the number of forward calls."""
        import torch

        self.handle.remove()
        if not self.seen:
            raise RuntimeError("AutoRound never ran the model's embedding: no calibration data was used")
        seen = torch.cat([s.reshape(-1, s.shape[-1]) for s in self.seen])
        expected = torch.stack(windows)
        if not torch.equal(seen, expected):
            raise RuntimeError(f"AutoRound calibrated on other token ids than bpdq's windows: saw "
                               f"{tuple(seen.shape)}, expected {tuple(expected.shape)}")
        return len(self.seen)


def check_fake_quantized(model: Any, layer_config: dict[str, dict[str, Any]]) -> list[str]:
    """Names of the linears AutoRound quantized (``bits`` < 16); each weight group must hold at most
    2**bits distinct values (the dequantized weights are what the perplexity measures)."""
    names = []
    for name, cfg in layer_config.items():
        if cfg.get("bits", 16) >= 16:
            continue
        weight = model.get_submodule(name).weight.detach()
        groups = weight.reshape(weight.shape[0], -1, cfg["group_size"])
        distinct = (groups.sort(dim=-1).values.diff(dim=-1) != 0).sum(dim=-1) + 1
        if int(distinct.max()) > 2 ** cfg["bits"]:
            raise RuntimeError(f"{name}: a group holds {int(distinct.max())} distinct values after AutoRound, "
                               f"more than 2**{cfg['bits']}: the model is not fake-quantized")
        names.append(name)
    if not names:
        raise RuntimeError("AutoRound quantized no linear layer")
    return names


def model_bpw(model: Any, layer_config: dict[str, dict[str, Any]], names: list[str], scale_bits: int) -> float:
    """Average storage bpw over the quantized linears, weighted by their sizes."""
    total = bits = 0.0
    for name in names:
        cfg = layer_config[name]
        n = model.get_submodule(name).weight.numel()
        total += n
        bits += n * storage_bpw(cfg["bits"], cfg["group_size"], cfg["sym"], scale_bits)
    return bits / total


def check_group_size(model: Any, group_size: int) -> None:
    """``group_size`` must divide the input width of every decoder linear (before any quantization work)."""
    import math

    from torch import nn

    widths = {m.in_features for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in name}
    if any(w % group_size for w in widths):
        g = math.gcd(*widths)
        raise SystemExit(f"--group-size {group_size} does not divide the decoder linears' input widths "
                         f"{sorted(widths)}; allowed: {[d for d in range(1, g + 1) if g % d == 0]}")


def used_quantizers(autoround: Any) -> list[str]:
    """Class names of the algorithms the AutoRound compressor composed (preprocessors, then the quantizer)."""
    composer = getattr(autoround, "_alg_composer", None)
    if composer is None or getattr(composer, "block_quantizer", None) is None:
        raise RuntimeError("the AutoRound compressor has no algorithm composer: cannot tell which quantizer ran")
    return [type(a).__name__ for a in (*composer.preprocessors, composer.block_quantizer)]


def text_option(text: str) -> tuple[str, str]:
    """``NAME=SPEC`` (SPEC: builtin:NAME or a .txt/.jsonl file) as ``(name, spec)``."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=SPEC (e.g. licenses=/tmp/licenses.txt)")
    return name, spec


def run(group_size: int, iters: int, quick: bool, sym: bool = False, enable_alg_ext: bool = False,
        texts: dict[str, str] | None = None) -> dict[str, Any]:
    AutoRound = import_auto_round()
    import torch

    from bpdq.evaluate import eval_windows, perplexity
    from bpdq.calibration import load_text
    from bpdq.models import load_pretrained
    from bpdq.engine.passes import token_windows

    base = calibration_config(quick)
    calibration = base["calibration"]
    model, tokenizer = load_pretrained(base["model"], dtype=base["dtype"], device="cpu")
    check_group_size(model, group_size)
    windows = token_windows(tokenizer, calibration, model.get_input_embeddings().num_embeddings)  # as bpdq's run
    dataset = [w.unsqueeze(0) for w in windows]  # AutoRound takes a list of [1, seq_len] token-id tensors
    pad = tokenizer.pad_token_id  # AutoRound masks these out of its calibration (none in bpdq's built-in text)
    pad_tokens = 0 if pad is None else int(sum(int((w == pad).sum()) for w in windows))
    texts = {PRIMARY: EVAL_TEXT, **(texts or {})}
    loaded = {name: load_text(spec) for name, spec in texts.items()}  # a bad text fails before the long run
    settings = {
        "auto_round": AUTO_ROUND_VERSION, "bits": BITS, "group_size": group_size, "sym": sym, "iters": iters,
        "nsamples": len(windows), "seqlen": windows[0].numel(), "amp": False, "device_map": "cpu",
        "enable_alg_ext": enable_alg_ext, "to_quant_block_names": QUICK_BLOCKS if quick else None,
    }
    logger.info("AutoRound %s on %s (%s): %d calibration windows of %d tokens", settings, base["model"],
                base["dtype"], len(windows), windows[0].numel())
    recorder = EmbeddingRecorder(model)
    start = time.perf_counter()
    autoround = AutoRound(model, tokenizer, scheme="W2A16", bits=BITS, group_size=group_size, sym=sym,
                          iters=iters, nsamples=len(windows), seqlen=windows[0].numel(), dataset=dataset,
                          amp=False, device_map="cpu", enable_alg_ext=enable_alg_ext,
                          **({"to_quant_block_names": QUICK_BLOCKS} if quick else {}))
    model, layer_config = autoround.quantize()
    quantizers = used_quantizers(autoround)
    if enable_alg_ext != ("SignRoundV2Quantizer" in quantizers):
        raise RuntimeError(f"enable_alg_ext={enable_alg_ext} but AutoRound ran {quantizers}")
    quantize_time = time.perf_counter() - start
    calls = recorder.check(windows)
    names = check_fake_quantized(model, layer_config)
    for name in names:
        resolved = {k: layer_config[name][k] for k in ("bits", "group_size", "sym")}
        if resolved != {"bits": BITS, "group_size": group_size, "sym": sym}:
            raise RuntimeError(f"AutoRound resolved {resolved} for {name}, not the settings asked for")
    scale_dtype = getattr(torch, str(autoround.scale_dtype).removeprefix("torch."))
    scale_bits = torch.finfo(scale_dtype).bits

    ev = QUICK_EVAL if quick else EVAL
    by_text, evals = {}, {}
    for name, text in loaded.items():
        n_windows = int(eval_windows(tokenizer, text, ev["seq_len"], ev["max_windows"]).shape[0])
        start = time.perf_counter()
        by_text[name] = perplexity(model, tokenizer, text, seq_len=ev["seq_len"], max_windows=ev["max_windows"])
        evals[name] = {"text": texts[name], "seq_len": ev["seq_len"], "windows": n_windows,
                       "time_s": time.perf_counter() - start}
    return {
        "row": f"autoround-w{BITS}g{group_size}",
        "description": f"peer: AutoRound W{BITS} g{group_size} {'sym' if sym else 'asym'}, {iters} iters"
                       + (" + enable_alg_ext" if enable_alg_ext else "") + ", fp32",
        "bpw": model_bpw(model, layer_config, names, scale_bits),
        "perplexity": by_text[PRIMARY],
        "perplexity_by_text": by_text,
        "quantize_time_s": quantize_time,
        "settings": {
            **settings,
            "quantizers": quantizers,
            "scale_dtype": str(scale_dtype).removeprefix("torch."),
            "enable_torch_compile": autoround.enable_torch_compile,
            "model": base["model"],
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "layers_quantized": len(names),
            "calibration": calibration,
            "calibration_forward_calls": calls,
            "calibration_windows_verified": True,
            "pad_tokens_in_windows": pad_tokens,
            "eval": evals,
            "quick": quick,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group-size", type=positive_int, default=64, help="weights per group (default 64)")
    p.add_argument("--iters", type=positive_int, default=None,
                   help=f"AutoRound iterations per block (default {ITERS}; {QUICK_ITERS} with --quick)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (W2A16's own default; asymmetric without)")
    p.add_argument("--enable-alg-ext", action="store_true",
                   help="AutoRound's algorithm extension (SignRoundV2); in auto-round 0.16.1 it changes the "
                   "rounding only on symmetric int grids")
    p.add_argument("--text", type=text_option, action="append", default=[], metavar="NAME=SPEC",
                   help=f"another evaluation text besides {EVAL_TEXT} (repeatable)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK['calibration']['samples']} x "
                   f"{QUICK['calibration']['seq_len']} calibration, the first decoder layer, {QUICK_ITERS} iters, "
                   f"{QUICK_EVAL['max_windows']} eval windows of {QUICK_EVAL['seq_len']}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    iters = args.iters or (QUICK_ITERS if args.quick else ITERS)
    # stdout carries the JSON only: anything AutoRound or transformers write to it goes to stderr
    stdout = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    result = run(args.group_size, iters, args.quick, args.sym, args.enable_alg_ext, dict(args.text))
    stdout.write(json.dumps(result) + "\n")
    stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
