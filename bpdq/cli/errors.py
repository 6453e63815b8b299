"""Exit codes: 2 for bad usage / bad config / unreadable input (``UsageError``), 1 for a failure while running.

Each command reads and checks everything it needs inside ``usage_phase()``, which turns the library's
validation errors (``ValueError``, ``TypeError``, ``OSError``) into a ``UsageError`` with a short context
("calibration.text", "model", ...); whatever fails after that is a failure while running.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad usage, a bad config or unreadable input: reported in one paragraph with exit code 2."""


@contextlib.contextmanager
def usage_phase(context: str = "") -> Iterator[None]:
    """Re-raise validation and input errors as ``UsageError`` prefixed with ``context``."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, OSError) as exc:
        message = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in message:
            message = f"{exc.filename}: {message}"
        raise UsageError(f"{context}: {message}" if context else message) from exc
