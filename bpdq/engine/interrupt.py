"""Stopping a run on SIGINT or SIGTERM: at once while it loads the model and captures the calibration
inputs (nothing to save yet), cleanly at a decoder-layer boundary once the layers are in work."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)
_STOP = threading.Event()
_LAYERS = threading.Event()  # the layer loop has begun: a first signal waits for its boundary


class RunInterrupted(KeyboardInterrupt):
    """The run stopped at a layer boundary on request; ``state`` is where it can resume from (or ``None``)."""

    def __init__(self, layers_done: int, n_layers: int, state: Path | None) -> None:
        where = f"; its state is kept in {state}" if state is not None else ""
        super().__init__(f"stopped after {layers_done} of {n_layers} decoder layers{where}")
        self.layers_done, self.n_layers, self.state = layers_done, n_layers, state


def stop_requested() -> bool:
    return _STOP.is_set()


def layers_begin() -> None:
    """The run reaches its first decoder layer: from now on (until the handlers are restored) a first signal
    asks for a stop at the next layer boundary instead of interrupting at once."""
    _LAYERS.set()


@contextlib.contextmanager
def stop_at_layer_boundary() -> Iterator[None]:
    """While active, SIGINT or SIGTERM raises ``KeyboardInterrupt`` at once until :func:`layers_begin`
    (loading a model or capturing activations can take minutes, and nothing is saved yet); after it, the
    first signal asks the run to stop after the current layer (raising :class:`RunInterrupted` there) and a
    second one raises ``KeyboardInterrupt`` at once. Main thread only."""

    def handler(_signum: int, _frame: Any) -> None:
        if _STOP.is_set() or not _LAYERS.is_set():
            _STOP.set()
            raise KeyboardInterrupt
        _STOP.set()
        logger.warning("stop requested: finishing the current layer and saving the state (signal again to stop now)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    _STOP.clear()
    _LAYERS.clear()
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _STOP.clear()
        _LAYERS.clear()


