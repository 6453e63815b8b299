"""The public entry points: ``quantize(model, config)`` for a whole model, ``quantize_weight`` for one weight,
``save`` and ``load`` for checkpoints."""

from __future__ import annotations

import logging
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from bpdq.allocation import check_target_bpw
from bpdq.checkpoint import load, unique_state_dict
from bpdq.config import CalibrationConfig, QuantizeConfig, Recipe, Rule, as_config, as_recipe, as_rules
from bpdq.devices import resolve_autocast, resolve_device
from bpdq.engine import distributed
from bpdq.engine.builtin import config_stages
from bpdq.engine.lock import lock_output
from bpdq.engine.loop import run_quantization
from bpdq.engine.resume import ResumeState, check_resume_mode
from bpdq.engine.sink import CheckpointSink, InMemorySink, Sink, check_output_dir
from bpdq.engine.source import InMemorySource, LazySource, ModelSource
from bpdq.engine.stages import Stage, check_stages
from bpdq.experts import QuantExperts
from bpdq.linear import QuantLinear
from bpdq.models.base import get_adapter
from bpdq.quantized import dtype_name
from bpdq.report import RunReport
from bpdq.shards import DEFAULT_MAX_SHARD_SIZE
from bpdq.solvers.build import build_grid, build_solver, quantize_weight
from bpdq.tuning import TuningOptions

__all__ = ["build_grid", "build_solver", "load", "quantize", "quantize_model", "quantize_weight", "save"]

logger = logging.getLogger(__name__)


@distributed.reports_failure
def quantize(
    model: nn.Module | str | Path, config: QuantizeConfig | dict[str, Any] | str | Path, *,
    tokenizer: Any = None, stages: Sequence[Stage] = (),
) -> RunReport:
    """Quantize a causal LM as ``config`` says and return the run's report.

    ``model`` is a transformers model object (quantized in place) or a local model directory (``config.json``
    + safetensors weights, read one decoder layer at a time in ``config.dtype``; ``config.output`` is then
    required). ``config`` is a :class:`~bpdq.config.QuantizeConfig`, a dict of its fields, or a path to a
    YAML/JSON file (a strategy file's ``model:`` is ignored there). ``tokenizer`` draws the calibration windows
    (a model directory's own is used when not given). ``stages`` (:class:`~bpdq.engine.stages.Stage`) extend
    the layer loop after the built-in ones.

    With ``config.output`` the checkpoint is written there as the run goes, appearing atomically at the end;
    the output is locked for the run (another process writing it raises ``ValueError`` naming its PID) and
    may not be, contain or lie inside the model directory or the calibration file; with ``config.resume`` the run keeps its state beside it after each decoder layer and continues an
    interrupted run with the same fingerprint. Inside an initialised ``torch.distributed`` group of several
    processes (e.g. under ``torchrun``) every rank calls this with the same arguments: the calibration
    batches are shared out, the Hessians summed over the ranks, and rank 0 writes the output.
    """
    return _quantize(model, as_config(config), tokenizer=tokenizer, stages=stages)


def _quantize(model: Any, config: QuantizeConfig, *, tokenizer: Any, stages: Sequence[Stage],
              windows: Sequence[torch.Tensor] | None = None, calibration_given: bool = True) -> RunReport:
    stages = check_stages([*config_stages(config, stages), *stages])
    device = distributed.rank_device(resolve_device(config.device))  # checked (the allowed values in its error) before any work
    resolve_autocast(config.calibration.autocast, device)
    dtype = None if config.dtype == "auto" else config.dtype
    if isinstance(model, nn.Module):
        held = next(model.parameters()).dtype
        if dtype is not None and dtype_name(held) != dtype:
            raise ValueError(f"dtype applies to a model directory; cast an in-memory model before quantizing it "
                             f"(it holds {dtype_name(held)}, the config asks for {dtype})")
    elif isinstance(model, (str, Path)) or isinstance(model, LazySource):
        if config.output is None:
            raise ValueError("quantizing a model directory needs output= (the checkpoint is written as the run goes)")
    elif not isinstance(model, ModelSource):
        raise TypeError(f"model must be an nn.Module or a model directory path, got {type(model).__name__}")
    if config.resume is not None and config.output is None:
        raise ValueError("resume needs output= (the state is kept beside the checkpoint directory)")
    with ExitStack() as locked:
        if config.output is not None:  # checked, resolved and locked before anything is read or removed
            output = check_output_dir(config.output, config.overwrite, inputs=run_inputs(model, config))
            if distributed.rank() == 0:
                locked.enter_context(lock_output(output))
            config = config.model_copy(update={"output": str(output)})
        return _quantize_at(model, config, tokenizer=tokenizer, stages=stages, windows=windows,
                            calibration_given=calibration_given, dtype=dtype)


def run_inputs(model: Any, config: QuantizeConfig) -> dict[str, Path | None]:
    """What a run of ``model`` with ``config`` reads from disk (the model directory, the calibration file):
    its output may be none of them, nor inside or above them."""
    directory: Any = None
    if isinstance(model, LazySource):
        directory = model.directory
    elif isinstance(model, (str, Path)):
        directory = model
    else:
        module = model.model if isinstance(model, ModelSource) else model
        directory = getattr(getattr(module, "config", None), "_name_or_path", None) or None
    text = config.calibration.text
    found = {"model directory": directory, "calibration text": None if text.startswith("builtin:") else text}
    return {k: Path(v).expanduser() if v is not None and Path(v).expanduser().exists() else None for k, v in found.items()}


def _quantize_at(model: Any, config: QuantizeConfig, *, tokenizer: Any, stages: Sequence[Stage],
                 windows: Sequence[torch.Tensor] | None, calibration_given: bool, dtype: str | None) -> RunReport:
    state = ResumeState(config.output, config.resume) if config.resume is not None else None
    source: ModelSource
    if isinstance(model, ModelSource):
        source = model
    elif isinstance(model, (str, Path)):
        source = LazySource(model, dtype)
        if tokenizer is None:
            tokenizer = _directory_tokenizer(Path(model).expanduser())
    else:
        source = InMemorySource(model)
    sink: Sink = InMemorySink() if config.output is None or distributed.rank() != 0 else CheckpointSink(
        config.output, tokenizer, overwrite=config.overwrite, max_shard_size=config.max_shard_size,
        inputs=run_inputs(model, config),
    )
    return run_quantization(source, sink, config, tokenizer=tokenizer, stages=stages, resume=state, windows=windows,
                            calibration_given=calibration_given)


def _directory_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        logger.warning("no tokenizer in %s (%s): the checkpoint will have none", directory, exc)
        return None


@distributed.reports_failure
def quantize_model(
    model: nn.Module | str | Path | ModelSource,
    tokenizer: Any = None,
    *,
    recipe: Recipe | dict[str, Any],
    calibration: CalibrationConfig | dict[str, Any] | Sequence[torch.Tensor] | None = None,
    rules: Iterable[Rule | dict[str, Any]] = (),
    device: str | torch.device = "auto",
    progress: bool = True,
    batch_size: int = 8,
    output: str | Path | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | str | None = None,
    offload: int | str | None = None,
    asymmetric: bool | None = None,
    tuning: Any = None,
    target_bpw: float | None = None,
    resume: str | None = None,
    autocast: str | None = None,
    stages: Sequence[Stage] = (),
) -> RunReport:
    """Deprecated: use :func:`quantize` with a :class:`~bpdq.config.QuantizeConfig` (each keyword here is one
    of its fields; ``calibration`` may also be a list of token-id tensors, calibrated on as given)."""
    warnings.warn("bpdq.quantize_model is deprecated and will be removed in the next release: use "
                  "bpdq.quantize(model, bpdq.QuantizeConfig(...), tokenizer=...)", DeprecationWarning, stacklevel=2)
    recipe, rules = as_recipe(recipe), as_rules(rules)
    dev = resolve_device(device)
    if autocast is not None:
        resolve_autocast(autocast, dev)
    if resume is not None:
        check_resume_mode(resume)
    windows: Sequence[torch.Tensor] | None = None
    if isinstance(calibration, CalibrationConfig):
        calib = calibration.model_dump()
    elif isinstance(calibration, dict):
        calib = CalibrationConfig(**calibration).model_dump()
    else:
        calib, windows = {}, calibration
    if asymmetric is not None and not isinstance(asymmetric, bool):
        raise TypeError(f"asymmetric must be True or False, got {asymmetric!r}")
    if tuning is not None and not isinstance(tuning, (TuningOptions, dict)):
        raise TypeError(f"tuning must be a TuningOptions, a dict or None, got {type(tuning).__name__}")
    if target_bpw is not None:
        check_target_bpw(target_bpw, recipe.group_size)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    given = {"offload": offload, "asymmetric": asymmetric, "autocast": autocast}
    calib.update({k: v for k, v in given.items() if v is not None}, batch_size=batch_size)
    config = QuantizeConfig(
        quantize=recipe, rules=list(rules), calibration=CalibrationConfig(**calib), tuning=tuning,
        target_bpw=target_bpw, output=None if output is None else str(output), overwrite=overwrite,
        max_shard_size=max_shard_size, resume=resume, device=str(dev), progress=progress,
        dtype="auto" if dtype is None else (dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype),
    )
    return _quantize(model, config, tokenizer=tokenizer, stages=stages, windows=windows,
                     calibration_given=calibration is not None)


def _layer_prefixes(model: nn.Module) -> list[str]:
    """The decoder layers' names when an adapter knows the model (a shard unit each), else none."""
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
    :func:`quantize` run with ``output`` writes them."""
    if not any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules()):
        raise ValueError("the model holds no QuantLinear module: nothing was quantized, so it is not saved as a bpdq checkpoint")
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
