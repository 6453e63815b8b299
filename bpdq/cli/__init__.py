"""Command line: ``bpdq quantize|eval|inspect|generate`` (also ``python -m bpdq.cli``)."""

from bpdq.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
