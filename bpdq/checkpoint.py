"""bpdq checkpoints: save a quantized model to a directory and load it back.

A checkpoint directory holds ``config.json`` (the model config with a ``quantization_config``:
``quant_method: "bpdq"``, ``format_version``, ``bpdq_version`` and a ``modules`` table giving every
QuantLinear's planes, group size, bias, kernel, grid and solver), the weights (``<module>.planes``,
``<module>.coeffs``, ``<module>.bias`` of every QuantLinear plus every unquantized tensor; a tied weight is
stored once) as one ``model.safetensors`` or, above ``max_shard_size``, as shards with a
``model.safetensors.index.json`` (see :mod:`bpdq.shards`), the tokenizer files and ``bpdq_report.json``. It
is written to a temporary directory beside the target and renamed into place, so an interrupted save leaves
no half checkpoint (:mod:`bpdq.engine.sink`). This module reads checkpoints (:func:`load`) and describes
their format; :func:`bpdq.save` writes them.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from bpdq.devices import resolve_device
from bpdq.experts import PROJECTIONS, QuantExperts, buffer_prefix
from bpdq.kernels.base import check_kernel_name
from bpdq.linear import QuantLinear
from bpdq.shards import WEIGHTS_FILE, WeightFiles  # noqa: F401  (WEIGHTS_FILE: public name)
from bpdq.version import __version__

QUANT_METHOD = "bpdq"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODULE_FIELDS = {"planes", "group_size", "bias", "kernel", "grid", "solver"}
#: An entry of a fused experts module (:class:`~bpdq.experts.QuantExperts`): ``"type": "experts"``.
EXPERTS_FIELDS = {"type", "kernel", "projections"}
PROJECTION_FIELDS = {"planes", "group_size", "grid", "solver"}
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
        elif isinstance(m, QuantExperts):
            modules[name] = {"type": "experts", "kernel": m.kernel, "projections": {
                p: {k: v for k, v in m.meta[p].items() if v or k in ("planes", "group_size")} for p in PROJECTIONS}}
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


def is_bpdq_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a ``config.json`` whose ``quantization_config`` is bpdq's (not validated)."""
    config = Path(directory).expanduser() / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    qc = data.get("quantization_config") if isinstance(data, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


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
        if "type" in entry:
            _check_experts_entry(name, entry)
            continue
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


def _check_experts_entry(name: str, entry: dict[str, Any]) -> None:
    where = f"quantization_config.modules[{name!r}]"
    if entry.get("type") != "experts":
        raise ValueError(f"{where}.type must be 'experts' (the only typed entry), got {entry.get('type')!r}")
    unknown = set(entry) - EXPERTS_FIELDS
    if unknown:
        raise ValueError(f"{where} has unknown fields {sorted(unknown)}; allowed {sorted(EXPERTS_FIELDS)}")
    projections = entry.get("projections")
    if not isinstance(projections, dict) or set(projections) != set(PROJECTIONS):
        raise ValueError(f"{where}.projections must be an object with exactly {list(PROJECTIONS)}")
    for proj, settings in projections.items():
        if not isinstance(settings, dict) or set(settings) - PROJECTION_FIELDS:
            raise ValueError(f"{where}.projections.{proj} must be an object with fields among {sorted(PROJECTION_FIELDS)}")
        for key in ("planes", "group_size"):
            value = settings.get(key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{where}.projections.{proj}.{key} must be an integer, got {value!r}")


def packed_names(modules: dict[str, dict[str, Any]]) -> set[str]:
    """The names of the packed buffers (planes and coefficients, always stored as they are) of a module table."""
    out: set[str] = set()
    for name, entry in modules.items():
        if entry.get("type") == "experts":
            out |= {f"{name}.{buffer_prefix(p)}_{b}" for p in PROJECTIONS for b in ("planes", "coeffs")}
        else:
            out |= {f"{name}.{b}" for b in ("planes", "coeffs")}
    return out


def replace_linears(model: nn.Module, modules: dict[str, dict[str, Any]], *, kernel: str | None = None) -> None:
    """Swap the ``nn.Linear`` named in ``modules`` (a checkpoint's table) for empty QuantLinear modules of
    the same shape, on the linear's device (``meta`` included), and the fused experts modules of its
    ``experts`` entries for empty :class:`~bpdq.experts.QuantExperts`. ``kernel`` overrides the stored kernel."""
    for name, entry in modules.items():
        if entry.get("type") == "experts":
            try:
                experts = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"quantization_config names module {name!r}, which the model does not have") from None
            if not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
                raise ValueError(f"quantization_config names {name!r}, a {type(experts).__name__}, not fused experts")
            try:
                q = QuantExperts.like(experts, entry["projections"], kernel=kernel or entry.get("kernel", "auto"))
            except ValueError as exc:
                raise ValueError(f"quantization_config.modules[{name!r}]: {exc}") from None
            model.set_submodule(name, q)
            continue
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
        model.set_submodule(name, q)


def _check_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], files: WeightFiles | None = None) -> None:
    """Every tensor ``expected`` is ``found`` with its shape and dtype, and nothing else (``files``: the
    weight files ``found`` lists, to name them)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint tensors{'' if files is None else f' in {files.directory}'} do not match the model: "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    for name, ref in expected.items():
        t, where = found[name], "" if files is None else f" (in {files.where[name].name})"
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(ref.shape)}{where}")
        if t.dtype != ref.dtype:
            raise ValueError(f"checkpoint tensor {name!r} has dtype {t.dtype}, the model expects {ref.dtype}{where}")


def stored_dtype(header: dict[str, torch.Tensor], modules: dict[str, dict[str, Any]]) -> torch.dtype:
    """The dtype a checkpoint's model was saved in: that of most of its floating-point elements outside the
    packed buffers (whose coefficients are always fp16). ``config.dtype`` is not trusted: it says what the
    model was built with, not what it was cast to before saving."""
    packed = packed_names(modules)
    counts: dict[torch.dtype, int] = {}
    for name, t in header.items():
        if name not in packed and t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


_LAYER_NAME = re.compile(r"(.+?)\.(\d+)\.")


def stored_layers(names: Iterable[str]) -> tuple[str, int]:
    """``(prefix, count)`` of the decoder layers among tensor ``names``: the prefix before the first number
    that most names share (``model.layers``) and one more than its largest index; ``("", 0)`` when no
    name holds a number."""
    indices: dict[str, set[int]] = {}
    for name in names:
        if m := _LAYER_NAME.match(name):
            indices.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not indices:
        return "", 0
    prefix = max(indices, key=lambda p: len(indices[p]))
    return prefix, max(indices[prefix]) + 1


def check_config(config: Any, files: WeightFiles, path: Path) -> None:
    """Refuse a ``config.json`` (at ``path``) that disagrees with the weights' headers before the model is built
    from it: it may not ask for more decoder layers than the weights hold (fewer is a model cut short: the
    rest is not read), and a one-layer model built from it on the meta device (no memory) must give every
    tensor it shares with the weights the stored shape. So the sizes a model built from it allocates are
    bounded by the weights on disk, whatever the config says."""
    prefix, n_layers = stored_layers(files.meta)
    declared = getattr(config, "num_hidden_layers", None)
    if not isinstance(declared, int) or isinstance(declared, bool) or not 0 <= declared <= n_layers:
        held = f"{n_layers} decoder layers ({prefix}.0 to {prefix}.{n_layers - 1})" if n_layers else "no decoder layers"
        raise ValueError(f"{path} disagrees with the weights: it says num_hidden_layers {declared!r}, "
                         f"the safetensors files hold {held}")
    from transformers import AutoModelForCausalLM

    probe = copy.deepcopy(config)
    probe.num_hidden_layers = min(declared, 1)
    if isinstance(getattr(probe, "layer_types", None), list):
        probe.layer_types = probe.layer_types[:1]
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(probe)
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build a model from
        raise ValueError(f"cannot build a model from {path}: {type(exc).__name__}: {exc}") from None
    for name, ref in model.state_dict().items():
        stored = files.meta.get(name)
        if stored is not None and tuple(stored.shape) != tuple(ref.shape):
            raise ValueError(f"{path} disagrees with the weights: from it, tensor {name!r} would have shape "
                             f"{tuple(ref.shape)}; {files.where[name].name} holds {tuple(stored.shape)}")


def skeleton(directory: str | Path, *, kernel: str | None = None) -> tuple[nn.Module, WeightFiles]:
    """A checkpoint's model on the meta device (QuantLinear modules in place) and its weight files, every
    stored tensor checked against the model (name, shape, dtype) from the headers; nothing is read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if kernel is not None:
        check_kernel_name(kernel)
    path = Path(directory).expanduser()
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(f"{path} is not a bpdq checkpoint: {CONFIG_FILE} is missing")
    try:
        config_data = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config_data, dict):
        raise ValueError(f"{path / CONFIG_FILE} is not a JSON object")
    qc = config_data.pop("quantization_config", None)
    modules = check_quantization_config(qc)
    if "model_type" not in config_data:
        raise ValueError(f"{path / CONFIG_FILE} has no 'model_type'")
    files = WeightFiles(path)
    try:
        config = AutoConfig.for_model(**config_data)
    except Exception as exc:  # noqa: BLE001 - any failure to validate the file is the file's fault
        raise ValueError(f"cannot read {path / CONFIG_FILE}: {exc}") from None
    check_config(config, files, path / CONFIG_FILE)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=stored_dtype(files.meta, modules))
    replace_linears(model, modules, kernel=kernel)
    model.tie_weights()
    _check_tensors(unique_state_dict(model), files.meta, files)
    model.config.quantization_config = qc
    return model, files


def load(
    directory: str | Path, *, device: str = "cpu", kernel: str | None = None
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a bpdq checkpoint (one ``model.safetensors`` or shards with an index);
    quantized linears are QuantLinear modules (no dense weight is ever materialised), and shards are read
    one at a time straight into the model (no second copy of the weights). The model gets the dtype its
    tensors were saved in. ``tokenizer`` is ``None`` when the checkpoint holds no tokenizer files (one
    quantized from a weights-only directory); tokenizer files that cannot be loaded are an error.

    ``kernel=None`` keeps each module's stored kernel (as ``from_pretrained`` does); a name (``"auto"``
    included) replaces it for every module. ``device`` is checked before anything is read.
    """
    dev = resolve_device(device)
    model, files = skeleton(directory, kernel=kernel)
    for file in files.files:
        names = [n for n, f in files.where.items() if f == file]
        model.load_state_dict(files.read(names), strict=False, assign=True)
    model.tie_weights()
    return model.to(dev).eval(), directory_tokenizer(files.directory)


#: Files of which at least one is in a directory with a (transformers) tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def directory_tokenizer(path: Path) -> Any:
    """The tokenizer saved in directory ``path``, or ``None`` when it holds no tokenizer files."""
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"the tokenizer in {path} cannot be loaded: {exc}") from None
