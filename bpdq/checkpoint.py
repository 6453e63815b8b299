"""bpdq checkpoints: save a quantized model to a directory and load it back.

A checkpoint directory holds ``config.json`` (the model config with a ``quantization_config``:
``quant_method: "bpdq"``, ``format_version``, ``bpdq_version`` and a ``modules`` table giving every
QuantLinear's planes, group size, bias, kernel, grid and solver), the weights (``<module>.planes``,
``<module>.coeffs``, ``<module>.bias`` of every QuantLinear plus every unquantized tensor; a tied weight is
stored once) as one ``model.safetensors`` or, above ``max_shard_size``, as shards with a
``model.safetensors.index.json`` (see :mod:`bpdq.shards`), the tokenizer files and ``bpdq_report.json``. It
is written to a temporary directory beside the target and renamed into place, so an interrupted save leaves
no half checkpoint (:mod:`bpdq.pipeline.sink`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bpdq.linear import QuantLinear
from bpdq.report import RunReport
from bpdq.shards import DEFAULT_MAX_SHARD_SIZE, WEIGHTS_FILE, WeightFiles  # noqa: F401  (WEIGHTS_FILE: public name)

QUANT_METHOD = "bpdq"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODULE_FIELDS = {"planes", "group_size", "bias", "kernel", "grid", "solver"}
LOADING_NOTE = (
    "bpdq checkpoint: pip install bpdq, then load it with bpdq.load(dir), or import bpdq before "
    "transformers' AutoModelForCausalLM.from_pretrained(dir). Without bpdq, transformers skips this "
    "quantization_config and builds a dense model whose quantized linear layers are randomly initialised."
)


def quantization_config(model: nn.Module, recipes: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` describing ``model``'s QuantLinear modules.

    ``recipes`` gives each module's grid/solver; modules it lacks keep those of the model's current bpdq
    ``quantization_config`` (a loaded checkpoint saved again keeps its metadata).
    """
    from bpdq import __version__

    previous = getattr(getattr(model, "config", None), "quantization_config", None)
    if hasattr(previous, "to_dict"):  # a transformers config object (model loaded with from_pretrained)
        previous = previous.to_dict()
    is_bpdq = isinstance(previous, dict) and previous.get("quant_method") == QUANT_METHOD
    known = previous.get("modules", {}) if is_bpdq else {}
    recipes = recipes or {}
    modules = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            entry = {"planes": m.k, "group_size": m.group_size, "bias": m.bias is not None, "kernel": m.kernel}
            source = recipes.get(name) or known.get(name) or {"grid": m.grid, "solver": m.solver}
            entry.update({k: source[k] for k in ("grid", "solver") if source.get(k)})
            modules[name] = entry
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "bpdq_version": __version__,
        "loading": LOADING_NOTE,
        "modules": modules,
    }


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every tensor once (a tied weight keeps its first name)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t
    return out


def config_dict(model: nn.Module) -> dict[str, Any]:
    """``model``'s config as written to ``config.json``, with its bpdq ``quantization_config``."""
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(model)
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    return config


def _layer_prefixes(model: nn.Module) -> list[str]:
    """The decoder layers' names when an adapter knows the model (a shard unit each), else none."""
    from bpdq.models.base import get_adapter

    try:
        adapter = get_adapter(model)
        return [f"{adapter.layers}.{i}" for i in range(len(adapter.decoder_layers(model)))]
    except ValueError:
        return []


def save(
    model: nn.Module,
    tokenizer: Any,
    directory: str | Path,
    *,
    report: RunReport | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``model`` (with its QuantLinear modules), ``tokenizer`` and ``report`` to ``directory``.

    Weights above ``max_shard_size`` bytes (an int, or a size such as ``"500MB"``) are split into shards at
    decoder-layer boundaries, with a ``model.safetensors.index.json``, exactly as a streaming
    :func:`bpdq.quantize_model` run with ``output=`` writes them."""
    from bpdq.pipeline.sink import CheckpointSink

    if report is not None and not isinstance(report, RunReport):
        raise TypeError(f"report must be a RunReport or None, got {type(report).__name__}")
    sink = CheckpointSink(directory, tokenizer, overwrite=overwrite, max_shard_size=max_shard_size)
    try:
        state = unique_state_dict(model)
        for prefix in _layer_prefixes(model):
            sink.write_tensors({k: v for k, v in state.items() if k.startswith(f"{prefix}.")})
            state = {k: v for k, v in state.items() if not k.startswith(f"{prefix}.")}
        return sink.finish(model, state, report)
    except BaseException:
        sink.abort()
        raise


def check_quantization_config(qc: Any) -> dict[str, dict[str, Any]]:
    """Validate a checkpoint's ``quantization_config``; return its ``modules`` table."""
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise ValueError(
            f"not a bpdq checkpoint: quantization_config.quant_method is {method!r}, expected {QUANT_METHOD!r}"
        )
    if qc.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"unsupported quantization_config.format_version {qc.get('format_version')!r}; "
            f"this bpdq reads {FORMAT_VERSION}"
        )
    modules = qc.get("modules")
    if not isinstance(modules, dict):
        raise ValueError("quantization_config.modules must be an object mapping module names to their settings")
    for name, entry in modules.items():
        if not isinstance(entry, dict):
            raise ValueError(f"quantization_config.modules[{name!r}] must be an object")
        unknown = set(entry) - MODULE_FIELDS
        if unknown:
            raise ValueError(
                f"quantization_config.modules[{name!r}] has unknown fields {sorted(unknown)}; "
                f"allowed {sorted(MODULE_FIELDS)}"
            )
        for key in ("planes", "group_size"):
            if not isinstance(entry.get(key), int) or isinstance(entry.get(key), bool):
                raise ValueError(
                    f"quantization_config.modules[{name!r}].{key} must be an integer, got {entry.get(key)!r}"
                )
    return modules


def replace_linears(model: nn.Module, modules: dict[str, dict[str, Any]], *, kernel: str | None = None) -> None:
    """Swap the ``nn.Linear`` named in ``modules`` (a checkpoint's table) for empty QuantLinear modules of
    the same shape, on the linear's device (``meta`` included). ``kernel`` overrides the stored kernel."""
    for name, entry in modules.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantization_config names module {name!r}, which the model does not have") from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantization_config names {name!r}, a {type(linear).__name__}, not an nn.Linear")
        try:
            q = QuantLinear(
                linear.in_features,
                linear.out_features,
                planes=entry["planes"],
                group_size=entry["group_size"],
                bias=linear.bias is not None,
                dtype=linear.weight.dtype,
                kernel=kernel or entry.get("kernel", "auto"),
                device=linear.weight.device,
                grid=entry.get("grid"),
                solver=entry.get("solver"),
            )
        except ValueError as exc:
            raise ValueError(f"quantization_config.modules[{name!r}]: {exc}") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)


def _check_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint tensors do not match the model: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    for name, ref in expected.items():
        t = found[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(t.shape)}, the model expects {tuple(ref.shape)}"
            )
        if t.dtype != ref.dtype:
            raise ValueError(f"checkpoint tensor {name!r} has dtype {t.dtype}, the model expects {ref.dtype}")


def load(directory: str | Path, *, device: str = "cpu", kernel: str = "auto") -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a bpdq checkpoint (one ``model.safetensors`` or shards with an index);
    quantized linears are QuantLinear modules (no dense weight is ever materialised), and shards are read
    one at a time straight into the model (no second copy of the weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(directory).expanduser()
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(f"{path} is not a bpdq checkpoint: {CONFIG_FILE} is missing")
    config_data = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    qc = config_data.pop("quantization_config", None)
    modules = check_quantization_config(qc)
    if "model_type" not in config_data:
        raise ValueError(f"{path / CONFIG_FILE} has no 'model_type'")
    files = WeightFiles(path)
    config = AutoConfig.for_model(**config_data)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    replace_linears(model, modules, kernel=kernel)
    model.tie_weights()
    _check_tensors(unique_state_dict(model), files.meta)
    for file in files.files:
        names = [n for n, f in files.where.items() if f == file]
        model.load_state_dict(files.read(names), strict=False, assign=True)
    model.tie_weights()
    model.config.quantization_config = qc
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model.to(device).eval(), tokenizer
