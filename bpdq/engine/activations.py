"""The activation container of a run: calibration batches in memory up to a budget, the rest on disk.

Capture (the first layer's inputs), every layer's outputs (the next layer's inputs), the full-precision stream
and resume all read and write :class:`ActivationStore` objects, so ``calibration.offload`` works through one
code path. Without a budget a store keeps every batch in memory. The stores made from one another
(:meth:`ActivationStore.empty_like`, :func:`outputs_like`) share one budget: ``calibration.offload`` bounds
the bytes in memory of every activation stream of a run together (the layer's inputs, its outputs, the
full-precision stream, the recorded sub-block outputs), and a store gives its share back when closed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from bpdq.batch import Batch
from bpdq.shards import parse_size


class _Budget:
    """Bytes of hidden states in memory, shared by the stores made from one another."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0


class ActivationStore(Sequence[Batch]):
    """Calibration batches whose hidden states stay in memory up to ``budget`` bytes (their dtype unchanged;
    the budget shared with the stores made from this one: see the module docstring); the rest are written to
    ``directory`` as safetensors files and read back when a pass reaches them. The keyword arguments (masks,
    position embeddings) are shared by every layer and stay in memory. Without a ``directory`` (and budget)
    every batch stays in memory."""

    _counter = 0

    def __init__(self, directory: Path | None = None, budget: int | str | None = None) -> None:
        if (directory is None) != (budget is None):
            raise ValueError("an ActivationStore needs both a directory and a budget, or neither")
        self.directory = directory
        self._pool = budget if isinstance(budget, _Budget) else (
            _Budget(parse_size(budget, "offload")) if budget is not None else None)
        self._items: list[Batch | tuple[Path, Batch]] = []
        self._in_memory = 0

    @property
    def budget(self) -> int | None:
        """The bytes in memory allowed to this store and those it shares its budget with (``None``: no limit)."""
        return self._pool.total if self._pool is not None else None

    @property
    def offloads(self) -> bool:
        """Whether batches beyond a budget go to disk."""
        return self._pool is not None

    @classmethod
    def from_batches(cls, batches: Sequence[Batch], directory: Path | None = None,
                     budget: int | str | None = None) -> "ActivationStore":
        store = cls(directory, budget)
        for b in batches:
            store.append(b)
        return store

    def empty_like(self) -> "ActivationStore":
        """An empty store with this one's directory, sharing its budget."""
        return ActivationStore(self.directory, self._pool)

    def append(self, batch: Batch) -> None:
        size = batch.hidden.numel() * batch.hidden.element_size()
        pool = self._pool
        if pool is None or pool.used + size <= pool.total:
            self._in_memory += size
            if pool is not None:
                pool.used += size
            self._items.append(batch)
            return
        from safetensors.torch import save_file

        ActivationStore._counter += 1
        assert self.directory is not None
        path = self.directory / f"hidden-{ActivationStore._counter:08d}.safetensors"
        save_file({"hidden": batch.hidden.contiguous()}, str(path))
        self._items.append((path, Batch(batch.hidden.new_empty(0), batch.args, batch.kwargs)))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Batch:  # type: ignore[override]
        item = self._items[index]
        if isinstance(item, Batch):
            return item
        from safetensors.torch import load_file

        path, rest = item
        return Batch(load_file(str(path))["hidden"], rest.args, rest.kwargs)

    @property
    def n_offloaded(self) -> int:
        return sum(not isinstance(item, Batch) for item in self._items)

    def close(self) -> None:
        """Delete this store's files and drop its batches, giving their bytes back to the shared budget."""
        for item in self._items:
            if not isinstance(item, Batch):
                item[0].unlink(missing_ok=True)
        self._items = []
        if self._pool is not None:
            self._pool.used -= self._in_memory
        self._in_memory = 0


def outputs_like(batches: Sequence[Batch]) -> ActivationStore:
    """An empty container for a pass's outputs over ``batches``: a store with the same directory, sharing its
    memory budget, when ``batches`` is an :class:`ActivationStore`, else one in memory."""
    return batches.empty_like() if isinstance(batches, ActivationStore) else ActivationStore()


def close(*streams: Any) -> None:
    """Delete the files of each stream that is an :class:`ActivationStore` (``None`` and lists are skipped)."""
    for stream in streams:
        if isinstance(stream, ActivationStore):
            stream.close()


