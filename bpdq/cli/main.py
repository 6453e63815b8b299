"""Argument parsing and exit codes of the ``bpdq`` command.

Exit codes: 0 success; 2 bad usage, bad config or unreadable input (one paragraph, no traceback); 1 a
failure while running (the traceback only under ``--debug``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Sequence

from bpdq.version import __version__
from bpdq.cli import cmd_eval, cmd_export, cmd_generate, cmd_inspect, cmd_quantize
from bpdq.cli.console import setup_logging
from bpdq.cli.runtime import distributed_rank_left
from bpdq.cli.errors import EXIT_FAILURE, EXIT_USAGE, UsageError

COMMANDS = (cmd_quantize, cmd_eval, cmd_inspect, cmd_generate, cmd_export)

log = logging.getLogger("bpdq.cli")


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("common options")
    group.add_argument("--debug", action="store_true", help="debug logging; show the traceback of a failure")
    group.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module (or a .py file) first, e.g. one that registers a grid or solver; repeatable",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bpdq",
        description="Quantize LLM weights to 2-4 bits with BPDQ (bit-plane decomposition on a variable grid), "
        "GPTQ or RTN; evaluate, inspect and run the checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"bpdq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_options()
    for command in COMMANDS:
        command.add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (argparse itself exits with 2 on bad arguments). A rank of a
    distributed run leaves the process at once with that code, once its output is flushed: the process
    group's native threads can abort the interpreter's shutdown after a successful run (SIGABRT)."""
    code = _main(argv)
    if distributed_rank_left():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    try:
        return int(args.run(args) or 0)
    except UsageError as exc:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"bpdq {args.command}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"bpdq {args.command}: interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: report, set the exit code
        if args.debug:
            traceback.print_exc()
            hint = ""
        else:
            hint = " (run again with --debug for the traceback)"
        sys.stderr.write(f"bpdq {args.command}: failed: {type(exc).__name__}: {exc}{hint}\n")
        return EXIT_FAILURE
