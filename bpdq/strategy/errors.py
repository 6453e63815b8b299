"""Strategy config errors: ``StrategyError`` (its lines are formatted by :mod:`bpdq.validation`)."""

from __future__ import annotations

from typing import Sequence

from bpdq.validation import format_errors, format_path

__all__ = ["StrategyError", "format_errors", "format_path"]


class StrategyError(ValueError):
    """A bad strategy config or override. ``problems`` holds one ``path: message`` line per problem."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems) or [message]
