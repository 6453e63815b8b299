"""Terminal output: logging to stderr (rich on a terminal, plain lines otherwise), tables and JSON on stdout.

With ``--json`` a command prints exactly one JSON object on stdout; everything else goes to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

_HANDLER_NAME = "bpdq-cli"


def setup_logging(debug: bool = False, rank: int = 0) -> None:
    """Send the ``bpdq`` loggers to stderr: rich formatting on a terminal, plain timestamped lines (no ANSI)
    otherwise. Only the ``bpdq`` logger is touched (a second call replaces the handler it added). A
    distributed run's ranks other than 0 log warnings and errors only, prefixed with their rank."""
    if rank:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [rank {rank}] %(message)s", "%H:%M:%S"))
    elif sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler.set_name(_HANDLER_NAME)
    logger = logging.getLogger("bpdq")
    logger.handlers[:] = [h for h in logger.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    logger.setLevel(logging.WARNING if rank else logging.DEBUG if debug else logging.INFO)


def stdout_console() -> Console:
    """A console on stdout; no colours or cursor control when stdout is not a terminal."""
    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)


def emit_json(obj: dict[str, Any]) -> None:
    """The single JSON object of a ``--json`` command."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def key_value_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in rows:
        table.add_row(key, str(value))
    return table


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def fmt_float(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"
