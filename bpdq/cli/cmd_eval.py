"""``bpdq eval MODEL_OR_DIR --text ...``: perplexity of a full-precision model or a bpdq checkpoint."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from bpdq.cli.console import emit_json, stdout_console
from bpdq.cli.errors import usage_phase
from bpdq.cli.runtime import positive_int, device_for, load_model, load_plugins, load_text, tokenizer_for

log = logging.getLogger("bpdq.cli")

#: ``bpdq.quantized.DTYPE_NAMES``, written out: building the parser must not import torch.
DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "eval",
        parents=[common],
        help="perplexity of a model or a bpdq checkpoint on a text",
        description="Perplexity over consecutive non-overlapping windows of a text (the same protocol for "
        "full-precision models and bpdq checkpoints).",
    )
    p.add_argument("model", metavar="MODEL_OR_DIR", help="built-in alias (e.g. smollm2-135m), model directory, "
                   "bpdq checkpoint directory or hub id")
    p.add_argument("--text", required=True, metavar="FILE|builtin:NAME",
                   help="a .txt/.jsonl file, a directory of them, or builtin:python-docs-test")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max-windows", type=positive_int, default=None, metavar="N", help="score at most N windows")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype of a full-precision model (default auto: as stored); a checkpoint keeps its own")
    p.add_argument("--tokenizer", metavar="DIR_OR_HUB_ID", default=None,
                   help="the tokenizer to use (default: the model's own; needed for a checkpoint saved without one)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bpdq.checkpoint import is_bpdq_checkpoint
    from bpdq.evaluate import eval_windows, perplexity
    from bpdq.models import check_positions

    load_plugins(args.plugin)
    device = device_for(args.device)
    text = load_text(args.text)
    model, tokenizer = load_model(args.model, device, dtype=args.dtype)
    tokenizer = tokenizer_for(args.model, tokenizer, args.tokenizer)
    with usage_phase("--seq-len"):
        check_positions(model, args.seq_len, "--seq-len")
    with usage_phase("--text"):
        windows = eval_windows(tokenizer, text, args.seq_len, args.max_windows)
    start = time.perf_counter()
    ppl = perplexity(model, tokenizer, text, seq_len=args.seq_len, max_windows=args.max_windows,
                     batch_size=args.batch_size)
    result = {
        "model": args.model,
        "quantized": is_bpdq_checkpoint(args.model),
        "text": args.text,
        "seq_len": args.seq_len,
        "windows": int(windows.shape[0]),
        "tokens": int(windows.numel()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "perplexity": ppl,
        "time_s": time.perf_counter() - start,
    }
    if args.json:
        emit_json(result)
    else:
        stdout_console().print(
            f"perplexity {ppl:.3f}  ({args.model} on {args.text}: {result['windows']} windows of {args.seq_len} tokens)",
            markup=False,
            highlight=False,
        )
    return 0
