"""``bpdq quantize CONFIG``: run a strategy config, write the checkpoint, print and save a summary."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from bpdq.cli.console import emit_json, stdout_console
from bpdq.cli.errors import UsageError, usage_phase
from bpdq.cli.runtime import device_for, load_model, load_plugins, load_text
from bpdq.cli.summary import SUMMARY_FILE, STRATEGY_FILE, run_summary, summary_tables

log = logging.getLogger("bpdq.cli")


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "quantize",
        parents=[common],
        help="quantize a model as a strategy config says and write a checkpoint",
        description="Quantize the decoder linears of a model with the recipe and rules of a strategy config "
        "(YAML or JSON), write a bpdq checkpoint, print a summary and save it as JSON beside the checkpoint.",
    )
    p.add_argument("config", metavar="CONFIG", help="strategy config file (.yaml, .yml or .json)")
    p.add_argument("--output", "-o", metavar="DIR", help="checkpoint directory (overrides the config's output)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field, e.g. --set quantize.group_size=128 (value read as YAML); repeatable",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.set_defaults(run=run)


def _output_dir(args: argparse.Namespace, configured: str | None) -> Path:
    if not (args.output or configured):
        raise UsageError("no output directory: set `output:` in the config or pass --output DIR")
    out = Path(args.output or configured).expanduser()  # type: ignore[arg-type]
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"output directory {str(out)!r} is not empty; pass --overwrite to replace it")
    return out


def run(args: argparse.Namespace) -> int:
    from bpdq.calibration import calibration_windows
    from bpdq.checkpoint import save
    from bpdq.pipeline import quantize_model
    from bpdq.strategy import load_strategy

    load_plugins(args.plugin)
    with usage_phase():
        strategy = load_strategy(args.config, args.overrides)
    output = _output_dir(args, strategy.output)
    device = device_for(strategy.device)
    load_text(strategy.calibration.text, "calibration.text")
    model, tokenizer = load_model(strategy.model, "cpu", dtype=strategy.dtype)
    with usage_phase("calibration"):
        windows = calibration_windows(tokenizer, strategy.calibration)
    log.info("quantizing %s on %s: %d calibration windows of %d tokens", strategy.model, device, len(windows),
             strategy.calibration.seq_len)
    report = quantize_model(
        model, tokenizer, recipe=strategy.quantize, calibration=windows, rules=strategy.rules, device=device
    )
    report.calibration = {**report.calibration, **strategy.calibration.model_dump(mode="json")}
    save(model, tokenizer, output, report=report, overwrite=args.overwrite)
    summary = run_summary(report, strategy.model, str(output))
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    strategy.model_copy(update={"output": str(output)}).save(output / STRATEGY_FILE)
    if args.json:
        emit_json(summary)
    else:
        console = stdout_console()
        for table in summary_tables(summary):
            console.print(table)
        console.print(f"checkpoint written to {output}", markup=False, highlight=False)
    return 0
