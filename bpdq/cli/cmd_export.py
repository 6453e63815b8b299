"""``bpdq export MODEL OUTPUT``: write a model (e.g. the built-in GGUF ``smollm2-135m``) as a safetensors
model directory, the input ``bpdq quantize`` reads one decoder layer at a time."""

from __future__ import annotations

import argparse
from typing import Any

from bpdq.cli.cmd_eval import DTYPES
from bpdq.cli.console import stdout_console
from bpdq.cli.errors import usage_phase
from bpdq.cli.runtime import load_plugins


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export",
        parents=[common],
        help="write a model (built-in alias, GGUF file, hub id) as a safetensors model directory",
        description="Write a full-precision model as config.json + safetensors shards + tokenizer files: the "
        "directory `bpdq quantize` reads one decoder layer at a time (transformers cannot save_pretrained a "
        "GGUF-loaded model; this rebuilds it from its config).",
    )
    p.add_argument("model", metavar="MODEL", help="built-in alias, .gguf file, model directory or hub id")
    p.add_argument("output", metavar="OUTPUT", help="directory to write")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype of the written weights (auto: as loaded; a GGUF file loads as float32)")
    p.add_argument("--max-shard-size", default="1GB", metavar="SIZE", help="largest shard, e.g. 500MB (default 1GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bpdq.engine.sink import check_output_dir
    from bpdq.export import export_model

    load_plugins(args.plugin)
    with usage_phase():
        check_output_dir(args.output, args.overwrite, flag="--overwrite")  # the command line's flag in the message
    with usage_phase(f"export {args.model!r}"):
        out = export_model(args.model, args.output, dtype=None if args.dtype == "auto" else args.dtype,
                           max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    stdout_console().print(f"model written to {out}", markup=False, highlight=False)
    return 0
