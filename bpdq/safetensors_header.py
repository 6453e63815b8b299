"""Checking a safetensors file before trusting it: the header is read and validated by hand (no tensor data).

A safetensors file is an 8-byte little-endian header length, a JSON header mapping tensor names to
``{"dtype", "shape", "data_offsets"}``, then the data. :func:`read_header` rejects, with a ``ValueError``
naming the file, whatever is not such a file: a file shorter than its header says (truncated), a header
length beyond the file or :data:`MAX_HEADER_BYTES` (e.g. a pickle file under a ``.safetensors`` name), a
header that is not JSON, and tensors whose byte range does not match their shape and dtype or lies outside
the file. Every loader calls it before reading weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

#: Largest header accepted (safetensors' own limit).
MAX_HEADER_BYTES = 100_000_000

#: Header dtype names -> torch dtypes (the ones a checkpoint of a causal LM can hold).
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_header(path: str | Path) -> dict[str, torch.Tensor]:
    """Meta tensors with the names, shapes and dtypes of the safetensors file ``path``, after checking that
    the file is a complete safetensors file (see the module docstring)."""
    return {name: meta for name, (meta, _, _) in _entries(Path(path)).items()}


def read_tensors(path: str | Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of the safetensors file ``path`` (CPU, stored dtype), checked as
    :func:`read_header` checks the file, then read with plain file reads into tensors that own their memory:
    no memory map, so nothing of the file stays mapped, and no page is held twice (mapped and copied) while
    a tensor is read. The file is closed on return."""
    path = Path(path)
    entries = _entries(path)
    out: dict[str, torch.Tensor] = {}
    with path.open("rb") as f:
        for name in names:
            if name not in entries:
                raise ValueError(f"{path} holds no tensor {name!r}")
            meta, start, nbytes = entries[name]
            t = torch.empty(meta.shape, dtype=meta.dtype)
            buf = memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
            f.seek(start)
            done = 0
            while done < nbytes:
                n = f.readinto(buf[done:])
                if not n:
                    raise ValueError(f"{path} ended while reading tensor {name!r} (truncated while being read?)")
                done += n
            out[name] = t
    return out


def _entries(path: Path) -> dict[str, tuple[torch.Tensor, int, int]]:
    """name -> (meta tensor, absolute byte offset of its data, byte count), the file checked."""
    bad = f"{path} is not a valid safetensors file"
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{bad}: it has {size} bytes, fewer than the 8-byte header length")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise ValueError(
                f"{bad} (truncated, or another format such as a pickle): its header length field says {n} bytes, "
                f"the file has {size} bytes"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{bad}: its header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{bad}: its header is not a JSON object")
    data_bytes = size - 8 - n
    entries: dict[str, tuple[torch.Tensor, int, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        meta = _tensor(bad, name, info, data_bytes)
        begin, end = info["data_offsets"]
        entries[name] = (meta, 8 + n + begin, end - begin)
    return entries


def _tensor(bad: str, name: str, info: object, data_bytes: int) -> torch.Tensor:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise ValueError(f"{bad}: the header entry of tensor {name!r} lacks dtype, shape or data_offsets")
    dtype = DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"{bad}: tensor {name!r} has unsupported dtype {info['dtype']!r}; allowed: {sorted(DTYPES)}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ValueError(f"{bad}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ValueError(f"{bad}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
        raise ValueError(
            f"{bad}: tensor {name!r} ({info['dtype']}{shape}) needs {numel * dtype.itemsize} bytes, its "
            f"data_offsets {offsets} hold {end - begin}"
        )
    if end > data_bytes:
        raise ValueError(
            f"{bad} (truncated?): tensor {name!r} ends at data byte {end}, the file holds {data_bytes} bytes of data"
        )
    return torch.empty(shape, dtype=dtype, device="meta")
