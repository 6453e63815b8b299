"""``bpdq quantize [CONFIG] [--model M --method M --bits K --group-size G ...]``: run a strategy config (a
file, flags, or a file with flags overriding it), write the checkpoint, print and save a summary.

A ``model:`` that is a local transformers directory (``config.json`` + safetensors) is read one decoder layer
at a time; any other model (built-in alias, GGUF file, hub id) is loaded whole. Either way the checkpoint is
written as the run goes and appears at the output path only when complete.

Resume (``--resume auto|never|required``, default ``auto``): the run keeps its state beside the output
(``.NAME.bpdq-resume/``, see :mod:`bpdq.engine.resume`) after each decoder layer; running the same command
again continues after the last finished layer (a changed model, calibration, recipe, rules... is refused,
naming what differs); ``never`` removes the old state and starts over; ``required`` refuses to start without
one. Ctrl-C or SIGTERM finishes the layer in work, saves the state, says how to resume and exits 130 (a
second signal stops at once, losing that layer; before the first layer, while the model loads and the
calibration inputs are captured, the first one does); the partial checkpoint directory is removed, the
state kept. After the last layer a signal no longer stops the run (only the checkpoint's write is left); once
the checkpoint is in place, signals no longer interrupt the command. Running the command again after it
completed is refused (the output is not empty); ``--overwrite`` quantizes again from the start.

One run per output: the output is locked (:mod:`bpdq.engine.lock`) from its check to the summary; a second
run on it exits 2 naming the first's PID. An output on, inside or above the model directory or the
calibration file is refused, even with ``--overwrite``.

Distributed (``torchrun --nproc_per_node=N -m bpdq.cli quantize CONFIG``): the command joins the process
group torchrun describes (gloo on CPU, nccl with CUDA; :mod:`bpdq.engine.distributed`); rank 0 logs, writes
the checkpoint and prints the summary, the other ranks log only warnings and errors. Every rank checks the
inputs (and builds the model's skeleton) before the group is made, so a bad input ends each rank with exit 2
on its own; an error on one rank during the run is reported by that rank and every rank exits with its code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Iterator

from bpdq.cli.console import emit_json, stdout_console
from bpdq.cli.errors import EXIT_FAILURE, EXIT_USAGE, UsageError, usage_phase
from bpdq.cli.runtime import device_for, left_distributed_group, load_model, load_plugins, load_text
from bpdq.cli.summary import SUMMARY_FILE, STRATEGY_FILE, run_summary, summary_tables

log = logging.getLogger("bpdq.cli")
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it (SIGTERM too: the run stopped cleanly either way)


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "quantize",
        parents=[common],
        help="quantize a model as a strategy config (or the flags) say and write a checkpoint",
        description="Quantize the decoder linears of a model with the recipe and rules of a strategy config "
        "(YAML or JSON) or of the flags below (which override the file's fields when both are given), write a "
        "bpdq checkpoint, print a summary and save it as JSON beside the checkpoint.",
    )
    p.add_argument("config", metavar="CONFIG", nargs="?", help="strategy config file (.yaml, .yml or .json)")
    p.add_argument("--model", metavar="M", help="model: a local directory, a built-in alias or a hub id")
    p.add_argument("--method", choices=METHODS, help="solver: rtn, gptq (uniform grid) or bpdq (bit-plane grid)")
    p.add_argument("--bits", type=_bits, metavar="K",
                   help="bit-planes for bpdq, uniform bits for rtn and gptq (1..8; default 2 for bpdq, 4 for rtn, 2 for gptq)")
    p.add_argument("--group-size", type=_positive, metavar="G", help="columns per group sharing coefficients")
    p.add_argument("--calibration", metavar="TEXT", help="calibration text: a .txt/.jsonl path, a directory, or builtin:NAME")
    p.add_argument("--samples", type=_positive, metavar="N", help="calibration windows")
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
    p.add_argument(
        "--resume",
        choices=("auto", "never", "required"),
        default="auto",
        help="continue an interrupted run from the state kept beside the output: auto (default: when there is "
        "one), never (remove it and start over), required (fail without one)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.set_defaults(run=run)


METHODS = ("rtn", "gptq", "bpdq")
DEFAULT_BITS = {"rtn": 4, "gptq": 2, "bpdq": 2}


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _bits(text: str) -> int:
    value = _positive(text)
    if value > 8:
        raise argparse.ArgumentTypeError(f"must be 1..8, got {text!r}")
    return value


def _strategy_data(args: argparse.Namespace) -> dict[str, Any]:
    """The raw strategy mapping: the file's (when given), with the flags applied over it, then ``--set``."""
    from bpdq.config import apply_override, read_config

    if args.config is None and args.model is None:
        raise UsageError("give a strategy config file, or --model (with --method, --bits, --group-size, --output)")
    data: dict[str, Any] = read_config(args.config) if args.config is not None else {}
    if args.model is not None:
        data["model"] = args.model
    recipe = data.setdefault("quantize", {})  # a malformed block is left for the validation to name
    if isinstance(recipe, dict):
        if args.method is not None:
            bitplane = args.method == "bpdq"
            bits = args.bits if args.bits is not None else DEFAULT_BITS[args.method]
            recipe["grid"] = {"type": "bitplane", "planes": bits} if bitplane else {"type": "uniform", "bits": bits}
            recipe["solver"] = {"type": args.method}
        elif args.bits is not None:
            grid = recipe.get("grid", "bitplane")
            kind = grid.get("type") if isinstance(grid, dict) else grid
            recipe["grid"] = {**(grid if isinstance(grid, dict) else {"type": kind}),
                              ("planes" if kind == "bitplane" else "bits"): args.bits}
        if args.group_size is not None:
            recipe["group_size"] = args.group_size
    calibration = data.setdefault("calibration", {})
    if isinstance(calibration, dict):
        if args.calibration is not None:
            calibration["text"] = args.calibration
        if args.samples is not None:
            calibration["samples"] = args.samples
    for assignment in args.overrides:
        apply_override(data, assignment)
    return data


def _output_dir(args: argparse.Namespace, configured: str | None, inputs: dict[str, str]) -> Path:
    """The output (its links resolved), checked before any work; ``inputs``: what the run reads."""
    from bpdq.engine.sink import check_output_dir

    if not (args.output or configured):
        raise UsageError("no output directory: set `output:` in the config or pass --output DIR")
    local = {k: v for k, v in inputs.items() if not v.startswith("builtin:") and Path(v).expanduser().exists()}
    with usage_phase():
        return check_output_dir(args.output or configured, args.overwrite, flag="--overwrite", inputs=local)  # type: ignore[arg-type]


def _check_resume(output: Path, mode: str) -> None:
    """A missing required state, or an unreadable one, before any work (nothing is changed)."""
    from bpdq.engine.resume import read_state, state_dir

    with resume_refusals():
        found = read_state(output, "auto" if mode == "required" else mode)
    if mode == "required" and found is None:
        raise UsageError(f"--resume required: there is no resume state at {state_dir(output)} (no finished layer was saved)")


@contextlib.contextmanager
def resume_refusals() -> Iterator[None]:
    """A resume state that cannot be used is a usage error, with the command line's way to start over."""
    from bpdq.engine.resume import ResumeRefused

    try:
        yield
    except ResumeRefused as exc:
        raise UsageError(f"--resume: {exc.problem}; pass --resume never to start over") from exc


def _ignore_signals() -> None:
    """The checkpoint is complete: a late Ctrl-C or SIGTERM must not report an interrupted run."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _tokenizer(directory: str, calibrated: bool) -> Any:
    """A model directory's tokenizer; ``None`` where it has none and the run is data-free."""
    from bpdq.checkpoint import directory_tokenizer

    tokenizer = directory_tokenizer(Path(directory).expanduser())
    if tokenizer is None and calibrated:
        raise UsageError(f"{directory} has no tokenizer files, and the calibration needs one to draw its windows "
                         "(a data-free solver such as rtn does not)")
    return tokenizer


def run(args: argparse.Namespace) -> int:
    from bpdq.cli.console import setup_logging
    from bpdq.engine import distributed
    from bpdq.engine.interrupt import RunInterrupted, stop_at_layer_boundary

    rank = distributed.rank_from_env()
    if rank:
        setup_logging(args.debug, rank)
    with stop_at_layer_boundary(), contextlib.ExitStack() as held:
        job = _prepare(args, held)  # every rank checks its inputs alone: a bad one ends it with 2, no group made yet
        created = distributed.init_from_env()
        try:
            code = _run(args, *job)
            distributed.agree()  # rank 0 wrote its summary: every rank ends with 0
            return code
        except RunInterrupted as exc:
            if rank == 0:
                sys.stderr.write(f"bpdq {args.command}: {exc}; run the same command again to resume (--resume "
                                 "auto, the default; --resume never starts over)\n")
            return EXIT_INTERRUPTED
        except distributed.PeerFailed as exc:
            log.debug("%s", exc)
            return exc.code
        except BaseException as exc:
            code = distributed.exit_code(exc)
            distributed.fail(EXIT_USAGE if isinstance(exc, UsageError) else code or EXIT_FAILURE)
            raise
        finally:
            if created:
                distributed.destroy()
                left_distributed_group()


def _prepare(args: argparse.Namespace, held: contextlib.ExitStack) -> tuple[Any, Any, Any, Any, Path]:
    """``(strategy, model, tokenizer, config, output)``: the strategy read and checked, the output locked (rank
    0, until ``held`` closes), the model loaded (a model directory: its skeleton) and the run's plan checked
    against it, each failing as a ``UsageError``."""
    from bpdq.engine import distributed
    from bpdq.engine.lock import lock_output
    from bpdq.engine.loop import preflight
    from bpdq.engine.plan import needs_calibration
    from bpdq.engine.source import LazySource, is_model_directory
    from bpdq.strategy import strategy_from_dict

    load_plugins(args.plugin)
    with usage_phase():
        source = f"strategy config {args.config!r}" if args.config is not None else "command line"
        strategy = strategy_from_dict(_strategy_data(args), source)
    output = _output_dir(args, strategy.output, {"model directory": strategy.model,
                                                 "calibration text": strategy.calibration.text})
    if distributed.rank_from_env() == 0:  # one run per output, from here until its summary is written
        with usage_phase():
            held.enter_context(lock_output(output))
    _check_resume(output, args.resume)
    device = device_for(strategy.device)
    calibrated = needs_calibration(strategy.quantize, strategy.rules)
    if calibrated:
        load_text(strategy.calibration.text, "calibration.text")
    model: Any
    if is_model_directory(strategy.model):
        with usage_phase(f"model {strategy.model!r}"):
            model = LazySource(strategy.model, None if strategy.dtype == "auto" else strategy.dtype, tune_allocator=True)
            tokenizer = _tokenizer(strategy.model, calibrated)
    else:
        model, tokenizer = load_model(strategy.model, "cpu", dtype=strategy.dtype)
    config = strategy.config().model_copy(update={"output": str(output), "overwrite": args.overwrite,
                                                  "resume": args.resume, "device": str(device)})
    with usage_phase():
        preflight(model.model if isinstance(model, LazySource) else model, config, device,
                  seq_len=strategy.calibration.seq_len, warn=False)  # the run warns about its rules itself
    return strategy, model, tokenizer, config, output


def _run(args: argparse.Namespace, strategy: Any, model: Any, tokenizer: Any, config: Any, output: Path) -> int:
    from bpdq.api import quantize
    from bpdq.engine import distributed
    from bpdq.engine.plan import needs_calibration

    if needs_calibration(strategy.quantize, strategy.rules):
        log.info("quantizing %s on %s: %d calibration windows of %d tokens", strategy.model, config.device,
                 strategy.calibration.samples, strategy.calibration.seq_len)
    else:
        log.info("quantizing %s on %s: data-free (no solver of the strategy uses a Hessian)", strategy.model, config.device)
    with resume_refusals():
        report = quantize(model, config, tokenizer=tokenizer)
    _ignore_signals()
    if distributed.rank() != 0:
        return 0
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
