"""Where a run's weights come from: a model object in memory, or a directory of safetensors shards.

A source hands out modules by dotted name (``load``) and takes them back (``release``). The in-memory source
returns the model's own modules and releases nothing. The lazy source builds the model skeleton on the meta
device from ``config.json``, checks every shard header against it before any tensor is read (a missing
tensor, or one of the wrong shape, is an error naming it; a mixture of experts' fused parameters are read
from the per-expert tensors ``save_pretrained`` writes), and materialises a module by reading only its
tensors (``safe_open`` per file, files closed after reading); ``release`` sends the module back to the meta
device, so a finished decoder layer holds no memory.

Memory held: in memory, the model. Lazy: the modules loaded and not yet released (the run keeps the
embeddings, the final norm and the head, and one decoder layer at a time).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from bpdq.checkpoint import CONFIG_FILE, check_config, is_bpdq_checkpoint, unique_state_dict
from bpdq.models.base import get_adapter
from bpdq.quantized import dtype_from_name
from bpdq.shards import WeightFiles

logger = logging.getLogger(__name__)


class ModelSource(ABC):
    """A causal LM whose modules are materialised on request; ``model`` is the module tree."""

    model: nn.Module

    @abstractmethod
    def load(self, name: str) -> nn.Module:
        """The module ``name`` (dotted, relative to the model) with real tensors, on the CPU for lazy sources."""

    @abstractmethod
    def release(self, name: str) -> None:
        """Drop the tensors of module ``name`` once its results are written (a no-op in memory)."""

    def load_outside(self, prefix: str) -> None:
        """Materialise every tensor of the model outside the module ``prefix`` (the decoder layers)."""
        self.load("")  # the in-memory default: everything is there already

    def release_outside(self, prefix: str) -> None:
        """Drop the tensors outside the module ``prefix`` until :meth:`load_outside` (a no-op in memory)."""


class InMemorySource(ModelSource):
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def load(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def release(self, name: str) -> None:
        return None


def is_model_directory(path: str | Path) -> bool:
    """A directory with a transformers ``config.json`` (not a bpdq checkpoint: that one is already quantized)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / CONFIG_FILE).is_file() and not is_bpdq_checkpoint(p)


class LazySource(ModelSource):
    """A transformers model directory (``config.json`` + safetensors) read one module at a time.

    ``dtype`` (a torch dtype or a name; ``None`` = the config's ``dtype``, else float32) is the dtype the
    floating tensors are materialised in, as ``from_pretrained(dtype=...)`` would load them.
    ``tune_allocator``: pin glibc's mmap threshold for the process (:func:`cap_mmap_threshold`; a process-wide
    setting that cannot be undone, so only a program that owns its process asks for it: the CLI does).
    """

    def __init__(self, directory: str | Path, dtype: torch.dtype | str | None = None, *, tune_allocator: bool = False) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.directory = Path(directory).expanduser()
        if not (self.directory / CONFIG_FILE).is_file():
            raise ValueError(f"{self.directory} is not a model directory: {CONFIG_FILE} is missing")
        self.files = WeightFiles(self.directory)  # checks the index, the shards and pickle-only directories
        # A run that reads layer by layer is one that must fit in memory. The skeleton's weights are allocated
        # on the CPU before they move to meta: under glibc's moving threshold they left a heap of their size
        # (500 MB for 6 hidden-2048 layers), free but reused piecemeal, so each layer re-dirtied part of it
        # between trims (a 6-layer GPTQ run peaked 0.2 GB above a 1-layer run); even at 4 MiB the weights
        # below it (k/v projections) left 4 MB of holes per layer (135 MB for 32 layers). So the skeleton is
        # built at glibc's smallest default threshold, and the run goes on at MMAP_THRESHOLD.
        try:
            config = AutoConfig.from_pretrained(str(self.directory))
        except Exception as exc:  # noqa: BLE001 - any failure to parse or validate the file is the file's fault
            raise ValueError(f"cannot read {self.directory / CONFIG_FILE}: {exc}") from None
        check_config(config, self.files, self.directory / CONFIG_FILE)
        if isinstance(dtype, str):
            dtype = dtype_from_name(dtype)
        stored = getattr(config, "dtype", None)
        self.dtype = dtype or (stored if isinstance(stored, torch.dtype) else torch.float32)
        if tune_allocator:
            cap_mmap_threshold(SKELETON_MMAP_THRESHOLD)
        try:
            with init_empty_weights(include_buffers=False):
                self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
            self.model.tie_weights()
        finally:
            if tune_allocator:
                cap_mmap_threshold()
        if not getattr(self.model.config, "architectures", None):
            self.model.config.architectures = [type(self.model).__name__]
        self.model.eval()
        self._check_headers()

    def _expected(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint must hold: the state dict with tied tensors once (the first name)."""
        return unique_state_dict(self.model)

    def _check_headers(self) -> None:
        stored = self.files.meta
        try:
            experts = get_adapter(self.model).experts
        except ValueError:  # not quantizable: the run says why
            experts = None
        #: Model tensors stored under other names (a mixture of experts' per-expert tensors): their stored
        #: names and how to combine them (:meth:`bpdq.models.moe.MoeLayout.stored`).
        self._stored: dict[str, tuple[list[str], Callable[[list[torch.Tensor]], torch.Tensor]]] = {}
        for name, ref in self._expected().items():
            t = stored.get(name)
            if t is None and experts is not None:
                found = experts.stored(name, stored)
                if found is not None:
                    self._stored[name] = found
                    shape = tuple(found[1]([stored[n] for n in found[0]]).shape)  # meta tensors: no data
                    if shape != tuple(ref.shape):
                        raise ValueError(f"{self.directory}: tensor {name!r} made of {found[0][0]!r}... has shape "
                                         f"{shape}, the model expects {tuple(ref.shape)}")
                    continue
            if t is None:
                raise ValueError(f"{self.directory}: tensor {name!r} of the model is in none of its safetensors files")
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(
                    f"{self.directory}: tensor {name!r} in {self.files.where[name].name} has shape {tuple(t.shape)}, "
                    f"the model ({type(self.model).__name__} from config.json) expects {tuple(ref.shape)}"
                )
        used = {n for names, _ in self._stored.values() for n in names}
        extra = sorted(set(stored) - set(self._expected()) - set(self.model.state_dict()) - used)
        if extra:
            logger.warning("%s: ignoring %d tensors the model does not use, e.g. %s", self.directory, len(extra), extra[:3])

    def _materialise(self, names: Iterable[str]) -> None:
        names = [n for n in names if self._tensor(n).is_meta]
        if not names:
            return
        direct = [n for n in names if n not in self._stored]
        read = self.files.read(direct + [s for n in names if n in self._stored for s in self._stored[n][0]])
        for name in names:
            if name in self._stored:
                parts, combine = self._stored[name]
                t = combine([read.pop(p) for p in parts])
            else:
                t = read.pop(name)
            current = self._tensor(name)
            if t.is_floating_point():
                t = t.to(current.dtype)
            self._assign(name, t)
        self.model.tie_weights()

    def _tensor(self, name: str) -> torch.Tensor:
        owner, _, attr = name.rpartition(".")
        module = self.model.get_submodule(owner)
        return module._parameters[attr] if attr in module._parameters else module._buffers[attr]

    def _assign(self, name: str, t: torch.Tensor) -> None:
        owner, _, attr = name.rpartition(".")
        module = self.model.get_submodule(owner)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(t, requires_grad=False)
        else:
            module._buffers[attr] = t

    def _names_under(self, prefix: str) -> list[str]:
        return [n for n in self._expected() if not prefix or n.startswith(f"{prefix}.")]

    def load(self, name: str) -> nn.Module:
        self._materialise(self._names_under(name))
        return self.model.get_submodule(name)

    def load_outside(self, prefix: str) -> None:
        self._materialise(n for n in self._expected() if not n.startswith(f"{prefix}."))

    def release(self, name: str) -> None:
        self.model.get_submodule(name).to("meta")
        return_freed_memory()

    def release_outside(self, prefix: str) -> None:
        """The embeddings, final norm and head go back to meta once the first layer's inputs are captured
        (``V d`` weights, twice when untied: 0.26 GB at hidden 2048 and a 32000 vocabulary in bf16, 4.2 GB
        for Llama-3-70B); the end of the run reads them again to write them and to quantize the head."""
        for name in self._expected():
            if not name.startswith(f"{prefix}."):
                self._assign(name, self._tensor(name).to("meta"))
        self.model.tie_weights()
        return_freed_memory()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


#: glibc's ``M_MMAP_THRESHOLD`` during a CLI run from a model directory: blocks from 4 MiB up are mapped, and go
#: back to the OS when freed. glibc's own threshold starts at 128 KiB but grows up to 32 MiB as large blocks
#: are freed, and then a solve's freed temporaries stay in the heap. Measured on a 2-layer hidden-2048 model
#: from disk: GPTQ 2-bit peaked at 1.02 GB with it and 1.15 GB without, BPDQ k=2 1.29 vs 1.55 GB, with no
#: consistent time cost (benchmarks/README.md). A ``MALLOC_MMAP_THRESHOLD_`` set in the
#: environment (glibc's own knob) is left alone.
MMAP_THRESHOLD = 4 * 2**20
#: While the meta skeleton is built (its weights pass through the CPU): glibc's smallest default threshold.
SKELETON_MMAP_THRESHOLD = 128 * 2**10


def cap_mmap_threshold(threshold: int | None = None) -> bool:
    """Pin glibc's mmap threshold at ``threshold`` bytes (default :data:`MMAP_THRESHOLD`; process-wide);
    ``False`` where the C library has no ``mallopt`` or refuses it, or the environment sets
    ``MALLOC_MMAP_THRESHOLD_`` (then nothing changes)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, MMAP_THRESHOLD if threshold is None else threshold))  # -3: M_MMAP_THRESHOLD


def return_freed_memory() -> None:
    """Give the heap memory freed by a released layer back to the OS (glibc's ``malloc_trim``; elsewhere a
    no-op). Without it glibc keeps the freed layer-sized blocks, and the RSS grows with every layer. The run
    also calls it after each sequential group: the group's Hessians and solver copies (a 2-layer
    hidden-2048 GPTQ run from disk peaked at 1.38 GB with it, 1.47 GB without)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
