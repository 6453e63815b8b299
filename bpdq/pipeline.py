"""Sequential calibration: quantize a whole causal LM in place, one decoder layer at a time.

For each decoder layer (moved alone to the compute device) and each sequential group of its linears
(q,k,v -> o -> gate,up -> down): accumulate the Hessians of the group's inputs, solve every linear with its
recipe, replace the ``nn.Linear`` by a ``QuantLinear``; then rerun the layer so that the next one is
calibrated on the quantized layer's outputs. Recipes come from rules matched against full module names
(first match wins, ``skip`` leaves a module in full precision). The output projection (``lm_head``) is
quantized only when a rule matches it; embeddings are never quantized.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from bpdq.api import quantize_weight
from bpdq.calibration import calibration_windows
from bpdq.checkpoint import quantization_config
from bpdq.config import CalibrationConfig, Recipe, Rule, as_recipe, as_rules, resolve_recipe
from bpdq.devices import resolve_device
from bpdq.layer_io import Batch, Replay, batch_windows, capture_layer_inputs, collect_hessians, run_layer
from bpdq.linear import QuantLinear
from bpdq.models.base import Adapter, architecture_of, check_positions, get_adapter
from bpdq.progress import RunProgress
from bpdq.report import ModuleRecord, RunReport
from bpdq.solvers.hessian import HessianAccumulator

logger = logging.getLogger(__name__)


def _windows(tokenizer: Any, calibration: Any, vocab_size: int) -> list[torch.Tensor]:
    if isinstance(calibration, (CalibrationConfig, dict)):
        return calibration_windows(tokenizer, calibration)
    if not isinstance(calibration, (list, tuple)) or not calibration:
        raise TypeError("calibration must be a CalibrationConfig, a dict, or a non-empty list of token-id tensors")
    windows = []
    for i, w in enumerate(calibration):
        if not isinstance(w, torch.Tensor) or w.dtype not in (torch.int64, torch.int32) or w.numel() == 0:
            raise TypeError(f"calibration[{i}] must be a non-empty integer tensor of token ids")
        if w.dim() == 2 and w.shape[0] == 1:
            w = w[0]
        if w.dim() != 1:
            raise ValueError(f"calibration[{i}] must be 1-D [seq] or [1, seq], got shape {tuple(w.shape)}")
        if int(w.min()) < 0 or int(w.max()) >= vocab_size:
            raise ValueError(f"calibration[{i}] holds token ids outside the vocabulary [0, {vocab_size})")
        windows.append(w.to(torch.int64))
    return windows


def _first_rule(name: str, rules: Sequence[Rule]) -> Rule | None:
    return next((r for r in rules if r.matches(name)), None)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _quantize_linear(
    root: nn.Module, rel: str, full: str, recipe: Recipe, hessian: torch.Tensor | None
) -> ModuleRecord:
    linear = root.get_submodule(rel)
    try:
        qw = quantize_weight(
            linear.weight, hessian, grid=recipe.grid, solver=recipe.solver, group_size=recipe.group_size
        )
    except ValueError as exc:
        raise ValueError(f"cannot quantize {full}: {exc}") from None
    _replace(root, rel, QuantLinear.from_quantized(qw, linear.bias, kernel=recipe.kernel))
    return ModuleRecord(
        name=full,
        skipped=False,
        n_params=linear.weight.numel(),
        recipe=recipe.model_dump(mode="json"),
        bits_per_weight=qw.bits_per_weight,
        proxy_loss=qw.stats.proxy_loss,
        relative_loss=qw.stats.relative_loss,
        time_s=qw.stats.time_s,
    )


def _quantize_layer(
    layer: nn.Module, prefix: str, adapter: Adapter, recipe: Recipe, rules: Sequence[Rule],
    batches: list[Batch], device: torch.device, progress: RunProgress,
) -> tuple[list[ModuleRecord], Replay]:
    """Quantize one layer's linears group by group; the returned Replay serves the layer's final rerun."""
    records = []
    groups = adapter.linear_groups(layer)
    replay = Replay(layer)
    done: set[str] = set()
    for group in groups:
        plan = {rel: resolve_recipe(f"{prefix}.{rel}", recipe, rules) for rel in group}
        todo = [rel for rel, r in plan.items() if r is not None]
        for rel in group:
            if plan[rel] is None:
                records.append(ModuleRecord(f"{prefix}.{rel}", skipped=True, n_params=layer.get_submodule(rel).weight.numel()))
                progress.advance()
        if todo:
            progress.describe(f"{prefix}: calibrating {', '.join(todo)}")
            hessians = collect_hessians(layer, todo, batches, device, replay)
            for rel in todo:
                progress.describe(f"{prefix}.{rel}")
                records.append(_quantize_linear(layer, rel, f"{prefix}.{rel}", plan[rel], hessians.pop(rel)))
                progress.advance()
        done.update(group)
        for block in adapter.replay:
            if all(rel in done for g in groups for rel in g if rel.startswith(f"{block}.")):
                replay.finish(block)
    return records, replay


def _quantize_head(
    model: nn.Module, adapter: Adapter, recipe: Recipe, rule: Rule, batches: list[Batch], device: torch.device
) -> ModuleRecord:
    head = model.get_submodule(adapter.head)
    norm = model.get_submodule(adapter.norm)
    head_recipe = rule.apply(recipe)
    assert head_recipe is not None  # the caller handles skip rules
    acc = HessianAccumulator(head.in_features, device=device)
    norm.to(device)
    for b in batches:
        acc.add(norm(b.hidden.to(device)))
    tied = getattr(model.config, "tie_word_embeddings", False)
    record = _quantize_linear(model, adapter.head, adapter.head, head_recipe, acc.hessian)
    if tied:  # the embedding keeps its dense weight; the head no longer shares it
        model.config.tie_word_embeddings = False
    return record


def _check_rules(model: nn.Module, adapter: Adapter, recipe: Recipe, rules: Sequence[Rule]) -> None:
    emb = model.get_input_embeddings()
    emb_name = next((n for n, m in model.named_modules() if m is emb), None)
    if emb_name is not None:
        rule = _first_rule(emb_name, rules)
        if rule is not None and not rule.skip:
            raise ValueError(
                f"rule {rule.match!r} asks to quantize the embedding {emb_name!r}; bpdq quantizes linears only"
            )
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for rule in rules:
        if not any(rule.matches(n) for n in linears):
            logger.warning("rule %r matches no linear module of the model", rule.match)
    decoder = [n for n in linears if n.startswith(f"{adapter.layers}.")]
    head_rule = _first_rule(adapter.head, rules)
    head = head_rule is not None and not head_rule.skip
    if not head and all(resolve_recipe(n, recipe, rules) is None for n in decoder):
        raise ValueError(
            f"the rules skip all {len(decoder)} decoder linears and no rule asks for {adapter.head!r}: nothing would "
            "be quantized (a bpdq checkpoint needs at least one quantized linear); remove or narrow the skip rules"
        )


def quantize_model(
    model: nn.Module,
    tokenizer: Any,
    *,
    recipe: Recipe | dict[str, Any],
    calibration: CalibrationConfig | dict[str, Any] | Sequence[torch.Tensor],
    rules: Iterable[Rule | dict[str, Any]] = (),
    device: str | torch.device = "auto",
    progress: bool = True,
    batch_size: int = 8,
) -> RunReport:
    """Quantize ``model`` (a transformers causal LM) in place and return the run's report."""
    start = time.perf_counter()
    recipe, rules = as_recipe(recipe), as_rules(rules)
    dev = resolve_device(device)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("the model already holds QuantLinear modules: it is quantized already")
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    _check_rules(model, adapter, recipe, rules)
    windows = _windows(tokenizer, calibration, model.get_input_embeddings().num_embeddings)
    check_positions(model, max(w.numel() for w in windows), "calibration seq_len")
    head_rule = _first_rule(adapter.head, rules)
    quantize_head = head_rule is not None and not head_rule.skip
    report = RunReport(model=architecture_of(model), total_params=sum(p.numel() for p in model.parameters()))
    report.calibration = (
        {"windows": len(windows), "seq_len": windows[0].numel()}
        | (as_calib_dict(calibration) if isinstance(calibration, (CalibrationConfig, dict)) else {})
    )
    n_steps = sum(len(g) for g in adapter.linear_groups(layers[0])) * len(layers) + int(quantize_head)
    was_training = model.training
    model.eval()
    with torch.no_grad(), RunProgress(len(layers), n_steps, enabled=progress and sys.stderr.isatty()) as bar:
        batches = capture_layer_inputs(model, layers[0], batch_windows(windows, batch_size))
        for i, layer in enumerate(layers):
            bar.layer(i)
            home = next(layer.parameters()).device
            layer.to(dev)
            prefix = f"{adapter.layers}.{i}"
            records, replay = _quantize_layer(layer, prefix, adapter, recipe, rules, batches, dev, bar)
            report.modules += records
            batches = run_layer(layer, batches, dev, replay)
            layer.to(home)
        if quantize_head:
            bar.describe(adapter.head)
            report.modules.append(_quantize_head(model, adapter, recipe, head_rule, batches, dev))
            bar.advance()
    model.train(was_training)
    recipes = {m.name: m.recipe for m in report.modules if m.recipe is not None}
    model.config.quantization_config = quantization_config(model, recipes)
    report.total_time_s = time.perf_counter() - start
    return report


def as_calib_dict(calibration: CalibrationConfig | dict[str, Any]) -> dict[str, Any]:
    cfg = calibration if isinstance(calibration, CalibrationConfig) else CalibrationConfig(**calibration)
    return cfg.model_dump(mode="json")
