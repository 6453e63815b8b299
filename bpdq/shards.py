"""Directories of safetensors weights: one ``model.safetensors``, or shards listed by
``model.safetensors.index.json`` (the layout transformers writes), read and written a few tensors at a time.

Reading (:class:`WeightFiles`): the index (or the single file) is checked before any tensor is read: a
directory holding only pickle weights (``.bin``, ``.pt``...) is refused without opening them, and a shard the
index names but the directory lacks is an error naming it. Tensors are read with plain file reads into
tensors that own their memory (:func:`bpdq.safetensors_header.read_tensors`): no memory map at all.

Writing (:class:`ShardWriter`): tensors arrive in *units* (a decoder layer's tensors, or the rest of the
model); a unit never straddles two shards, and a shard is written as soon as the next unit would take it over
``max_shard_size``. One shard becomes ``model.safetensors`` (no index); several become
``model-0000i-of-0000N.safetensors`` plus the index. The writer holds no tensor: each unit's bytes go at once
to a scratch file beside the shard, and the shard is assembled from it (header, then the tensors by element
size, largest first, then name, so every tensor is aligned) when it is complete, copied a few MiB at a time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import BinaryIO, Iterable

import torch

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_MAX_SHARD_SIZE = "1GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", re.IGNORECASE)



def parse_size(value: int | str, what: str = "max_shard_size") -> int:
    """Bytes from an int or a string such as ``"500MB"``, ``"2GB"``, ``"1GiB"`` (decimal and binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value)):
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    else:
        raise ValueError(f"{what} must be a positive int (bytes) or a size like '500MB', '2GB'; got {value!r}")
    if size <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return size


class WeightFiles:
    """The safetensors files of a model directory and which file holds which tensor (headers only)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.files = self._files()
        self.where: dict[str, Path] = {}
        self.meta: dict[str, torch.Tensor] = {}  # name -> meta tensor with the stored shape and dtype
        for file in self.files:
            self._read_header(file)

    def _files(self) -> list[Path]:
        d = self.directory
        index = d / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map' object): {exc}") from None
            for name in names:
                if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                    raise ValueError(f"{index} names {name!r}: shards must be .safetensors files in the same directory")
                if not (d / name).is_file():
                    raise ValueError(f"{index} names shard {name!r}, which is missing from {d}")
            return [d / n for n in names]
        if (d / WEIGHTS_FILE).is_file():
            return [d / WEIGHTS_FILE]
        found = sorted(d.glob("*.safetensors"))
        if found:
            return found
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{d} holds weights only as pickle files ({', '.join(pickles[:5])}): bpdq reads safetensors only and "
                "never unpickles; convert them once with transformers (from_pretrained + "
                "save_pretrained(safe_serialization=True)) in an environment you trust"
            )
        raise ValueError(f"{d} holds no {WEIGHTS_FILE}, {INDEX_FILE} or other .safetensors file")

    def _read_header(self, file: Path) -> None:
        from bpdq.safetensors_header import read_header

        for name, meta in read_header(file).items():
            self.where[name] = file
            self.meta[name] = meta

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (CPU, stored dtype), each file opened once and closed after reading (plain
        reads, no memory map: see :func:`bpdq.safetensors_header.read_tensors`)."""
        from bpdq.safetensors_header import read_tensors

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.where:
                raise ValueError(f"tensor {name!r} is in none of the safetensors files of {self.directory}")
            by_file.setdefault(self.where[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            out.update(read_tensors(file, file_names))
        return out


_COPY_BYTES = 16 << 20


def _dtype_names() -> dict[torch.dtype, str]:
    from bpdq.safetensors_header import DTYPES

    return {dtype: name for name, dtype in DTYPES.items()}


_DTYPE_NAMES = _dtype_names()


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class ShardWriter:
    """Writes units of tensors into ``directory`` as shards of at most ``max_shard_size`` bytes (a unit larger
    than that gets a shard of its own). Holds no tensor in memory: see the module docstring."""

    def __init__(self, directory: Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
        self.directory = directory
        self.max_bytes = parse_size(max_shard_size)
        self._scratch: BinaryIO | None = None  # the open shard's tensor bytes, in arrival order
        self._pending: dict[str, tuple[torch.dtype, list[int], int, int]] = {}  # name -> dtype, shape, start, bytes
        self._pending_bytes = 0
        self._written: set[str] = set()
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in tensors:
            if name in self._pending or name in self._written:
                raise ValueError(f"tensor {name!r} written twice")
        size = tensor_bytes(tensors.values())
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        if self._scratch is None:
            self._scratch = open(self.directory / f".scratch-{len(self._shards) + 1:05d}.bin", "w+b")
        for name, t in tensors.items():
            t = t.detach().to("cpu").contiguous()
            if t.dtype not in _DTYPE_NAMES:
                raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors files here do not hold; "
                                 f"allowed: {sorted(str(d) for d in _DTYPE_NAMES)}")
            start = self._scratch.tell()
            self._scratch.write(_bytes_of(t))
            self._pending[name] = (t.dtype, list(t.shape), start, t.numel() * t.element_size())
        self._pending_bytes += size
        self.total_bytes += size

    def _shard_path(self) -> Path:
        return self.directory / f".shard-{len(self._shards) + 1:05d}.safetensors"

    def _flush(self) -> None:
        path = self._shard_path()
        order = sorted(self._pending, key=lambda n: (-self._pending[n][0].itemsize, n))
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in order:
            dtype, shape, _, nbytes = self._pending[name]
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        scratch = self._scratch
        with open(path, "wb") as out:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            for name in order:
                _, _, start, nbytes = self._pending[name]
                if scratch is not None:
                    scratch.seek(start)
                    while nbytes:
                        chunk = scratch.read(min(nbytes, _COPY_BYTES))
                        out.write(chunk)
                        nbytes -= len(chunk)
        if scratch is not None:
            scratch.close()
            Path(scratch.name).unlink()
        self._scratch = None
        self._shards.append((path, sorted(self._pending)))
        self._written.update(self._pending)
        self._pending, self._pending_bytes = {}, 0

    def abort(self) -> None:
        """Give up: close and remove the open shard's scratch file (its descriptor, and the disk space of a
        deleted file, would otherwise live as long as whatever holds the writer). Shards already written stay
        for the caller to remove with their directory. Safe to call more than once."""
        scratch, self._scratch = self._scratch, None
        self._pending, self._pending_bytes = {}, 0
        if scratch is not None:
            scratch.close()
            Path(scratch.name).unlink(missing_ok=True)

    def close(self) -> list[Path]:
        """Write what is pending, give the shards their final names (and write the index); returns the files."""
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            path = self._shards[0][0].rename(self.directory / WEIGHTS_FILE)
            return [path]
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        files = []
        for i, (path, names) in enumerate(self._shards, start=1):
            final = path.rename(self.directory / f"model-{i:05d}-of-{n:05d}.safetensors")
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return files
