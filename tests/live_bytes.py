"""A test helper: the peak bytes of large tensors alive at once while some torch code runs."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Inside it, every tensor an aten operation returns whose storage holds at least ``min_bytes`` is tracked
    (by its storage; views keep it alive) until no tensor of that storage is left; :attr:`peak` is the
    largest sum of the tracked storages' bytes seen after any operation. Tensors made before the block (or
    without an aten operation) are not counted."""

    def __init__(self, min_bytes: int) -> None:
        super().__init__()
        self.min_bytes = min_bytes
        self._live: dict[int, tuple[int, list[weakref.ref]]] = {}
        self.peak = 0

    def _total(self) -> int:
        total = 0
        for key in list(self._live):
            nbytes, refs = self._live[key]
            refs[:] = [r for r in refs if r() is not None]
            if refs:
                total += nbytes
            else:
                del self._live[key]
        return total

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() < self.min_bytes:
                continue
            storage = t.untyped_storage()
            entry = self._live.get(storage.data_ptr())
            if entry is None or not any(r() is not None for r in entry[1]):
                entry = self._live[storage.data_ptr()] = (storage.nbytes(), [])
            entry[1].append(weakref.ref(t))
        self.peak = max(self.peak, self._total())
        return out
