"""Progress of a quantization run: a rich progress bar on a terminal (layer i/N, module, elapsed, ETA),
one log line per layer otherwise."""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger("bpdq.engine")


class RunProgress:
    def __init__(self, n_layers: int, n_steps: int, *, enabled: bool) -> None:
        self.n_layers = n_layers
        self.n_steps = n_steps
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None
        self._start = 0.0
        self._first: int | None = None  # the first layer this process runs (a resumed run skips some)

    def __enter__(self) -> "RunProgress":
        self._start = time.perf_counter()
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]layer {task.fields[layer]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("capturing inputs", total=self.n_steps, layer=f"0/{self.n_layers}")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def layer(self, index: int) -> None:
        elapsed = time.perf_counter() - self._start
        if self._progress is not None:
            self._progress.update(self._task, layer=f"{index + 1}/{self.n_layers}")
        else:
            if self._first is None:
                self._first = index
            done = index - self._first
            eta = f", ETA {elapsed / done * (self.n_layers - index):.0f} s" if done else ""
            logger.info("layer %d/%d (%.1f s elapsed%s)", index + 1, self.n_layers, elapsed, eta)

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)
        else:
            logger.debug("%s", text)

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)
