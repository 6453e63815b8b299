"""Stopping a run cleanly at a decoder-layer boundary on SIGINT or SIGTERM."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)
_STOP = threading.Event()


class RunInterrupted(KeyboardInterrupt):
    """The run stopped at a layer boundary on request; ``state`` is where it can resume from (or ``None``)."""

    def __init__(self, layers_done: int, n_layers: int, state: Path | None) -> None:
        where = f"; its state is kept in {state}" if state is not None else ""
        super().__init__(f"stopped after {layers_done} of {n_layers} decoder layers{where}")
        self.layers_done, self.n_layers, self.state = layers_done, n_layers, state


def stop_requested() -> bool:
    return _STOP.is_set()


@contextlib.contextmanager
def stop_at_layer_boundary() -> Iterator[None]:
    """While active, the first SIGINT or SIGTERM asks the run to stop after the current layer (raising
    :class:`RunInterrupted` there); a second one raises ``KeyboardInterrupt`` at once. Main thread only."""

    def handler(_signum: int, _frame: Any) -> None:
        if _STOP.is_set():
            raise KeyboardInterrupt
        _STOP.set()
        logger.warning("stop requested: finishing the current layer and saving the state (signal again to stop now)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    _STOP.clear()
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _STOP.clear()


