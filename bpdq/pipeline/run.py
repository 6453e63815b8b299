"""The quantization loop: per decoder layer, materialise -> calibrate -> solve -> write -> next inputs -> release.

For each decoder layer (moved alone to the compute device) and each sequential group of its linears
(q,k,v -> o -> gate,up -> down): accumulate the Hessians of the group's inputs, solve every linear with its
recipe, replace the ``nn.Linear`` by a ``QuantLinear``; then rerun the layer so that the next one is
calibrated on the quantized layer's outputs. Recipes come from rules matched against full module names
(first match wins, ``skip`` leaves a module in full precision). The output projection (``lm_head``) is
quantized only when a rule matches it; embeddings are never quantized.

One loop serves every case: the weights come from a :mod:`~bpdq.pipeline.source` (the model in memory, or a
directory of safetensors shards read one layer at a time) and the results go to a
:mod:`~bpdq.pipeline.sink` (the modules swapped in place, plus a checkpoint streamed layer by layer when
``output`` is given). When no module's solver needs a Hessian (e.g. RTN) the run is data-free: no
calibration text, no layer forward, shards in -> packed shards out.

Extension points (:class:`LayerHooks`): ``before_solve`` stages run on the materialised layer on the compute
device before any linear is solved (e.g. keeping a full-precision copy); ``calibrate`` replaces the symmetric
Hessians of a group; ``after_solve`` stages run on a layer whose linears are all solved, on the compute
device, before its outputs are computed (e.g. tuning against full-precision targets); ``after_write`` steps
run once a layer is written, before it is released.

With a :class:`~bpdq.pipeline.resume.ResumeState` the loop saves each written layer and the next inputs
beside the output, restores the layers a previous run finished, and stops at a layer boundary when a signal
asks (:mod:`bpdq.pipeline.resume`). Inside a ``torch.distributed`` group the same loop shares the
calibration batches out and sums the Hessians over the ranks (:mod:`bpdq.pipeline.distributed`).

The 2-bit levers plug in there: asymmetric calibration and coefficient tuning (:mod:`bpdq.pipeline.levers`,
which carry a full-precision stream ``fp_inputs`` beside the quantized inputs) and bit allocation to a
``target_bpw`` (:mod:`bpdq.pipeline.allocate`, a measuring pass before the loop that turns into per-module
rules).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from bpdq.api import build_solver, quantize_weight
from bpdq.checkpoint import quantization_config, replace_linears, unique_state_dict
from bpdq.config import CalibrationConfig, Recipe, Rule, as_recipe, as_rules, resolve_recipe
from bpdq.linear import QuantLinear
from bpdq.devices import AUTOCAST_DTYPES, resolve_autocast, resolve_device
from bpdq.models.base import Adapter, architecture_of, check_positions, get_adapter
from bpdq.pipeline import distributed
from bpdq.pipeline.allocate import allocate, check_allocatable
from bpdq.pipeline.calibrate import (
    ActivationStore,
    Batch,
    Replay,
    batch_windows,
    calibration_autocast,
    capture_layer_inputs,
    collect_hessians,
    run_layer,
    token_windows,
)
from bpdq.pipeline.levers import Levers
from bpdq.pipeline.resume import ResumeState, RunInterrupted, source_fingerprint, stop_requested, windows_hash
from bpdq.pipeline.sink import CheckpointSink, InMemorySink, Sink
from bpdq.pipeline.source import InMemorySource, LazySource, ModelSource, return_freed_memory
from bpdq.progress import RunProgress
from bpdq.report import ModuleRecord, RunReport
from bpdq.shards import DEFAULT_MAX_SHARD_SIZE, parse_size
from bpdq.solvers.hessian import HessianAccumulator

logger = logging.getLogger(__name__)


@dataclass
class LayerStep:
    """One decoder layer's step: everything the per-layer functions and hooks read and fill in.

    ``plan`` maps each sequential group's linears (relative names) to their recipe (``None`` = skip).
    ``inputs`` are the layer's inputs in the quantized model (``None`` in a data-free run); ``fp_inputs``
    a full-precision stream carried beside them (``None`` unless a caller provides one). ``outputs`` are
    filled in by :func:`layer_outputs` and become the next layer's ``inputs``; ``fp_outputs`` (filled in by
    a stage, e.g. from ``fp_layer``, a full-precision copy of the layer) the next ``fp_inputs``.
    """

    index: int
    prefix: str
    layer: nn.Module
    plan: list[dict[str, Recipe | None]]
    inputs: Sequence[Batch] | None
    fp_inputs: Sequence[Batch] | None = None
    outputs: Sequence[Batch] | None = None
    fp_outputs: Sequence[Batch] | None = None
    fp_layer: nn.Module | None = None
    records: list[ModuleRecord] = field(default_factory=list)
    replay: Replay | None = None
    fp_replay: Replay | None = None  # ``fp_layer``'s, when a stage replays its finished sub-blocks
    blocks: tuple[str, ...] = ()  # the sub-blocks a Replay may replay (the adapter's ``replay``)


@dataclass
class LayerHooks:
    """Stages plugged into the loop. ``before_solve(step, device)``: the layer is materialised on the device,
    nothing solved yet. ``calibrate(step, names, device)``: the Hessian to solve each linear ``names`` of the
    current group with (default: :func:`collect_hessians` on ``step.inputs``); it may replace a linear's
    weight by the target to fit (``step.replay`` replays the layer's finished sub-blocks). ``observe(step,
    device)``: the layer is solved and on the device; the stage reads it and must not change it (the
    recorded sub-block outputs are kept for the layer's final pass). ``after_solve(step, device)``: after the
    ``observe`` stages; a stage that changes the layer must keep its QuantLinear modules (the recorded
    sub-block outputs are dropped, so the outputs are recomputed). ``after_write(step)``: the layer is
    written to the sink, not yet released."""

    before_solve: list[Callable[[LayerStep, torch.device], None]] = field(default_factory=list)
    calibrate: Callable[[LayerStep, list[str], torch.device], dict[str, torch.Tensor]] | None = None
    after_solve: list[Callable[[LayerStep, torch.device], None]] = field(default_factory=list)
    after_write: list[Callable[[LayerStep], None]] = field(default_factory=list)
    observe: list[Callable[[LayerStep, torch.device], None]] = field(default_factory=list)


def _first_rule(name: str, rules: Sequence[Rule]) -> Rule | None:
    return next((r for r in rules if r.matches(name)), None)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def quantize_linear(
    root: nn.Module, rel: str, full: str, recipe: Recipe, hessian: torch.Tensor | None, *, release_hessian: bool = False
) -> ModuleRecord:
    """Solve the ``nn.Linear`` ``rel`` of ``root`` and swap it for a QuantLinear (on the weight's device);
    ``release_hessian``: as :func:`~bpdq.api.quantize_weight`'s."""
    linear = root.get_submodule(rel)
    try:
        qw = quantize_weight(
            linear.weight, hessian, grid=recipe.grid, solver=recipe.solver, group_size=recipe.group_size,
            release_hessian=release_hessian,
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


def layer_plan(layer: nn.Module, prefix: str, adapter: Adapter, recipe: Recipe, rules: Sequence[Rule]) -> list[dict[str, Recipe | None]]:
    """Each sequential group of ``layer``'s linears with the recipe of each linear (``None`` = skip)."""
    return [{rel: resolve_recipe(f"{prefix}.{rel}", recipe, rules) for rel in g} for g in adapter.linear_groups(layer)]


def solve_layer(
    step: LayerStep, adapter: Adapter, device: torch.device, progress: RunProgress,
    calibrate: Callable[[LayerStep, list[str], torch.device], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Quantize ``step.layer``'s linears group by group (calibrated on ``step.inputs`` by ``calibrate`` or
    :func:`collect_hessians`, or Hessian-free when those are ``None``); sets ``step.records`` and
    ``step.replay`` (set before the first group: the ``calibrate`` hook and the layer's final pass use it)."""
    layer, prefix = step.layer, step.prefix
    tails = dict(adapter.tails) if use_tails(step.inputs, device) else {}
    replay = step.replay = Replay(layer, tails) if step.inputs is not None else None
    blocks = (*adapter.replay, *(b for b in tails if b not in adapter.replay))
    done: set[str] = set()
    for group in step.plan:
        todo = [rel for rel, r in group.items() if r is not None]
        if replay is not None:
            for block, tail in tails.items():  # this group's pass reaches the tail: keep its input
                if f"{block}.{tail}" in group and all(
                    rel in done for g in step.plan for rel in g if rel.startswith(f"{block}.") and rel != f"{block}.{tail}"
                ):
                    replay.record_tail(block)
        for rel, r in group.items():
            if r is None:
                step.records.append(ModuleRecord(f"{prefix}.{rel}", skipped=True, n_params=layer.get_submodule(rel).weight.numel()))
                progress.advance()
        if todo:
            hessians: dict[str, torch.Tensor | None] = dict.fromkeys(todo)
            if step.inputs is not None:
                progress.describe(f"{prefix}: calibrating {', '.join(todo)}")
                hessians.update(calibrate(step, todo, device) if calibrate is not None
                                else collect_hessians(layer, todo, step.inputs, device, replay, group=True))
            owner = distributed.owners({rel: layer.get_submodule(rel).weight.numel() for rel in todo})
            solved: dict[str, ModuleRecord] = {}
            for rel in todo:  # in a distributed run, each rank its own linears of the group
                hessian = hessians.pop(rel)
                if owner[rel] == distributed.rank():
                    progress.describe(f"{prefix}.{rel}")
                    last = hessian is not None and not any(h is hessian for h in hessians.values())  # q/k/v share one
                    solved[rel] = quantize_linear(layer, rel, f"{prefix}.{rel}", group[rel], hessian,  # type: ignore[arg-type]
                                                  release_hessian=last)
            for rel in todo:
                step.records.append(distributed.share_linear(layer, rel, solved.get(rel), owner[rel]))
                progress.advance()
            del hessians
            return_freed_memory()  # the group's Hessians and solver copies, before the next group's
        done.update(group)
        if replay is not None:
            for block in blocks:
                if all(rel in done for g in step.plan for rel in g if rel.startswith(f"{block}.")):
                    replay.finish(block)


def use_tails(inputs: Sequence[Batch] | None, device: torch.device) -> bool:
    """Whether the layer's passes use the adapter's ``tails`` (:class:`~bpdq.pipeline.calibrate.Replay`):
    on a CPU, with the calibration activations in memory (no ``offload``). There the rest of a block
    (attention, the MLP's gate and up) costs far more time than keeping its last linear's input costs memory
    (``down_proj``'s input is ``intermediate / hidden`` times a hidden-state stream: 2.7x on SmolLM2) from
    the pass that calibrates it to the next; on an accelerator the device memory is the constraint."""
    return inputs is not None and device.type == "cpu" and not isinstance(inputs, ActivationStore)


def layer_outputs(step: LayerStep, device: torch.device) -> None:
    """The solved layer's outputs for ``step.inputs`` (the next layer's inputs) into ``step.outputs``."""
    assert step.inputs is not None
    step.outputs = run_layer(step.layer, step.inputs, device, step.replay)


@dataclass
class _Setup:
    recipe: Recipe
    rules: tuple[Rule, ...]
    adapter: Adapter
    layers: nn.ModuleList
    head_recipe: Recipe | None
    calibrated: bool


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


def needs_calibration(recipe: Recipe | dict[str, Any], rules: Iterable[Rule | dict[str, Any]] = ()) -> bool:
    """Whether a module quantized with ``recipe`` or a (non-skip) rule's override may need a Hessian: if not,
    the run is data-free. (The run itself decides per module of the model.)"""
    recipe = as_recipe(recipe)
    recipes = [recipe] + [r for r in (rule.apply(recipe) for rule in as_rules(rules)) if r is not None]
    return any(build_solver(dict(r.solver)).requires_hessian for r in recipes)


def _setup(model: nn.Module, recipe: Recipe, rules: tuple[Rule, ...]) -> _Setup:
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("the model already holds QuantLinear modules: it is quantized already")
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    _check_rules(model, adapter, recipe, rules)
    head_rule = _first_rule(adapter.head, rules)
    head_recipe = head_rule.apply(recipe) if head_rule is not None else None
    recipes = [r for i, layer in enumerate(layers) for g in layer_plan(layer, f"{adapter.layers}.{i}", adapter, recipe, rules)
               for r in g.values() if r is not None] + ([head_recipe] if head_recipe else [])
    calibrated = any(build_solver(dict(r.solver)).requires_hessian for r in recipes)
    return _Setup(recipe, rules, adapter, layers, head_recipe, calibrated)


def _on_device(module: nn.Module, device: torch.device) -> torch.device:
    """Move ``module`` to ``device``; returns where it was (its home)."""
    home = next(module.parameters()).device
    module.to(device)
    return home


def _quantize_head(source: ModelSource, s: _Setup, batches: Sequence[Batch] | None, device: torch.device) -> ModuleRecord:
    model = source.model
    head = source.load(s.adapter.head)
    hessian = None
    if batches is not None:
        norm = source.load(s.adapter.norm)
        acc = HessianAccumulator(head.in_features, device=device)
        home = _on_device(norm, device)
        try:
            for b in batches:
                acc.add(norm(b.hidden.to(device)))
        finally:
            norm.to(home)
        acc.all_reduce()
        hessian = acc.hessian
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:  # the embedding keeps its dense weight; the head gets its own copy to quantize
        head.weight = nn.Parameter(head.weight.detach(), requires_grad=False)
    home = _on_device(head, device)
    try:
        assert s.head_recipe is not None
        record = quantize_linear(model, s.adapter.head, s.adapter.head, s.head_recipe, hessian, release_hessian=True)
    finally:
        model.get_submodule(s.adapter.head).to(home)
    if tied:
        model.config.tie_word_embeddings = False
    return record


def run_quantization(
    source: ModelSource,
    sink: Sink,
    *,
    recipe: Recipe,
    rules: tuple[Rule, ...],
    tokenizer: Any,
    calibration: Any,
    device: torch.device,
    progress: bool,
    batch_size: int,
    offload: Any = None,
    hooks: LayerHooks | None = None,
    levers: Levers | None = None,
    target_bpw: float | None = None,
    resume: ResumeState | None = None,
    autocast: str = "none",
) -> RunReport:
    """The loop over ``source``'s decoder layers into ``sink`` (see the module docstring). ``levers``:
    asymmetric calibration / tuning; ``target_bpw``: bit allocation before the loop; ``autocast``: the
    compute dtype of the calibration passes (``calibration.autocast``'s values; ``auto`` resolved for
    ``device``); ``resume``: the state to continue from and to keep after each layer (:mod:`bpdq.pipeline.resume`; removed once the sink is
    finished). On any exception the layer in work goes back to its home device and ``sink.abort()`` removes
    what was written (the resume state stays). A stop requested by a signal
    (:func:`~bpdq.pipeline.resume.stop_at_layer_boundary`) raises :class:`RunInterrupted` after a layer."""
    start = time.perf_counter()
    hooks = hooks or LayerHooks()
    model = source.model
    was_training = model.training
    try:
        layers = get_adapter(model).layers  # before the run: a quantized model no longer looks Llama-shaped
        autocast = resolve_autocast(autocast, device)
        with calibration_autocast(AUTOCAST_DTYPES[autocast]):
            report = _run(source, sink, recipe, rules, tokenizer, calibration, device, progress, batch_size, offload,
                          hooks, levers or Levers(), target_bpw, resume, autocast)
        report.total_time_s = time.perf_counter() - start
        rest = {k: v for k, v in unique_state_dict(model).items() if not k.startswith(f"{layers}.")}
        sink.finish(model, rest, report)
        if resume is not None:
            resume.remove()
        distributed.agree()  # every rank ends successfully only if rank 0 wrote the checkpoint
    except BaseException as exc:
        sink.abort()
        code = distributed.exit_code(exc)
        if code is not None:
            distributed.fail(code)
        raise
    finally:
        model.train(was_training)
    return report


def _run(
    source: ModelSource, sink: Sink, recipe: Recipe, rules: tuple[Rule, ...], tokenizer: Any, calibration: Any,
    device: torch.device, progress: bool, batch_size: int, offload: Any, hooks: LayerHooks, levers: Levers,
    target_bpw: float | None, resume: ResumeState | None, autocast: str = "none",
) -> RunReport:
    model = source.model
    s = _setup(model, recipe, rules)
    if target_bpw is not None:
        check_allocatable(s, target_bpw)
    if (levers.fp_stream or target_bpw is not None) and distributed.is_distributed():
        raise ValueError("calibration.asymmetric, tuning and target_bpw are not supported in a distributed run "
                         f"({distributed.world_size()} processes): run them in one process")
    if (levers.fp_stream or target_bpw is not None) and not s.calibrated:
        raise ValueError("calibration.asymmetric, tuning and target_bpw need calibration data: use a solver that "
                         "uses a Hessian (not only 'rtn')")
    if levers.fp_stream:
        hooks = LayerHooks([levers.before_solve, *hooks.before_solve], levers.calibrate if levers.asymmetric else hooks.calibrate,
                           [*levers.after_solve(), *hooks.after_solve], hooks.after_write,
                           [*levers.observe(), *hooks.observe])
    report = RunReport(model=architecture_of(model), total_params=sum(p.numel() for p in model.parameters()))
    windows = None
    if s.calibrated:
        if calibration is None:
            raise ValueError("calibration is required: a solver of the recipe needs a Hessian (only 'rtn' runs without data)")
        windows = token_windows(tokenizer, calibration, model.get_input_embeddings().num_embeddings)
        check_positions(model, max(w.numel() for w in windows), "calibration seq_len")
        report.calibration = {"windows": len(windows), "seq_len": windows[0].numel()} | (
            _calib_dict(calibration) if isinstance(calibration, (CalibrationConfig, dict)) else {}
        ) | {"autocast": autocast}
    elif calibration is not None:
        logger.info("no solver of this recipe uses a Hessian: data-free run, the calibration is not used")
    done, first = 0, 0
    if resume is not None:
        done = resume.check(_fingerprint(source, s, windows, levers, target_bpw, batch_size, device, autocast))
    n_steps = sum(len(g) for g in s.adapter.linear_groups(s.layers[0])) * len(s.layers) + int(s.head_recipe is not None)
    model.eval()
    layers_prefix = s.adapter.layers
    with ExitStack() as stack:
        bar = stack.enter_context(RunProgress(len(s.layers), n_steps, enabled=progress and sys.stderr.isatty()))
        stack.enter_context(torch.no_grad())
        inputs: Sequence[Batch] | None = None
        fp_inputs: Sequence[Batch] | None = None
        if windows is not None:
            source.load_outside(layers_prefix)
            batches = batch_windows(windows, batch_size)
            first = distributed.shard_start(len(batches))  # the global number of this rank's first batch
            inputs = capture_layer_inputs(model, s.layers[0], distributed.shard(batches))
            source.release_outside(layers_prefix)  # read again after the last layer
            fp_inputs = inputs if levers.fp_stream else None
            if done:
                assert resume is not None
                inputs, fp_inputs = (resume.inputs(inputs, "hidden", first),
                                     resume.inputs(inputs, "fp", first) if levers.fp_stream else None)
            if offload is not None:
                spill = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bpdq-activations-")))
                budget = parse_size(offload, "offload") // 2 if levers.fp_stream else offload  # two streams
                same = fp_inputs is inputs
                inputs = ActivationStore.from_batches(inputs, spill, budget)
                if fp_inputs is not None:
                    fp_inputs = inputs if same else ActivationStore.from_batches(fp_inputs, spill, budget)
                logger.info("calibration activations: %d of %d batches offloaded to %s", inputs.n_offloaded,
                            len(inputs), spill)
        try:
            if target_bpw is not None:
                assert inputs is not None
                _allocate(source, s, inputs, device, target_bpw, report, resume, bar)
            if resume is not None and done:
                levers.tuning_results = list(resume.levers.get("tuning", []))
                report.modules += [ModuleRecord(**r) for r in resume.records()]
                restored = [sum(len(g) for g in s.adapter.linear_groups(s.layers[i])) for i in range(done)]
                for i in range(done):
                    _restore_layer(source, sink, resume, f"{layers_prefix}.{i}", i)
                    for _ in range(restored[i]):
                        bar.advance()
            for i in range(done, len(s.layers)):
                bar.layer(i)
                prefix = f"{layers_prefix}.{i}"
                step = run_layer_step(source, s, i, inputs, device, bar, hooks, last=i == len(s.layers) - 1,
                                      fp_inputs=fp_inputs)
                report.modules += step.records
                sink.write_layer(prefix, step.layer)
                for after_write in hooks.after_write:
                    after_write(step)
                if resume is not None:
                    resume.save_layer(i, quantization_config(step.layer)["modules"], unique_state_dict(step.layer),
                                      [asdict(r) for r in step.records], {"hidden": step.outputs, "fp": step.fp_outputs},
                                      {"tuning": levers.tuning_results} if levers.tuning is not None else {}, first)
                source.release(prefix)
                _close(inputs, fp_inputs)
                inputs, fp_inputs = step.outputs, step.fp_outputs
                if distributed.any_rank(stop_requested()):
                    raise RunInterrupted(i + 1, len(s.layers), resume.dir if resume is not None else None)
            source.load_outside(layers_prefix)
            if s.head_recipe is not None:
                bar.describe(s.adapter.head)
                report.modules.append(_quantize_head(source, s, inputs, device))
                bar.advance()
        finally:
            _close(inputs, fp_inputs)
    for key, entry in levers.report().items():
        setattr(report, key, entry)
    recipes = {m.name: m.recipe for m in report.modules if m.recipe is not None}
    model.config.quantization_config = quantization_config(model, recipes)
    return report


def _fingerprint(source: ModelSource, s: _Setup, windows: Sequence[torch.Tensor] | None, levers: Levers,
                 target_bpw: float | None, batch_size: int, device: torch.device, autocast: str = "none") -> dict[str, Any]:
    """What a resumed run must share with the run that saved the state (see :mod:`bpdq.pipeline.resume`)."""
    from bpdq import __version__

    return {
        "model": source_fingerprint(source),
        "calibration_sha256": windows_hash(windows),
        "calibration_autocast": autocast,
        "recipe": s.recipe.model_dump(mode="json"),
        "rules": [r.model_dump(mode="json") for r in s.rules],
        "levers": {"asymmetric": levers.asymmetric, "target_bpw": target_bpw,
                   "tuning": levers.tuning.model_dump(mode="json") if levers.tuning is not None else None},
        "batch_size": batch_size,
        "device": device.type,
        "versions": {"bpdq": __version__, "torch": torch.__version__},
        "world_size": distributed.world_size(),
    }


def _allocate(source: ModelSource, s: _Setup, inputs: Sequence[Batch], device: torch.device, target_bpw: float,
              report: RunReport, resume: ResumeState | None, bar: RunProgress) -> None:
    """The bit allocation's rules before the run's own (measured, or read from the resume state)."""
    saved = resume.levers.get("allocation") if resume is not None else None
    if saved is not None:
        plane_rules = [Rule(**r) for r in saved["rules"]]
        report.allocation = saved["report"]
    else:
        bar.describe("measuring losses for the bit allocation")
        allocation, plane_rules = allocate(source, s, inputs, device, target_bpw)
        report.allocation = allocation.to_dict()
        if resume is not None:
            resume.set_levers(allocation={"rules": [r.model_dump(mode="json") for r in plane_rules],
                                          "report": report.allocation})
    s.rules = (*plane_rules, *s.rules)


def _restore_layer(source: ModelSource, sink: Sink, resume: ResumeState, prefix: str, index: int) -> None:
    """A layer finished before the resume: its QuantLinear modules and tensors from the state, written to the
    sink exactly as they were, then released."""
    table, tensors = resume.layer(index)
    layer = source.model.get_submodule(prefix)
    replace_linears(layer, table)
    layer.load_state_dict(tensors, strict=True, assign=True)
    sink.write_layer(prefix, layer)
    source.release(prefix)


def _close(*streams: Sequence[Batch] | None) -> None:
    for stream in streams:
        if isinstance(stream, ActivationStore):
            stream.close()


def run_layer_step(
    source: ModelSource, s: _Setup, index: int, inputs: Sequence[Batch] | None, device: torch.device,
    progress: RunProgress, hooks: LayerHooks, *, last: bool = False, fp_inputs: Sequence[Batch] | None = None,
) -> LayerStep:
    """Materialise decoder layer ``index``, run the ``before_solve`` stages, solve it on ``device``, run the
    ``after_solve`` stages and compute its outputs (unless it is the last layer and the head is not
    quantized); the layer ends on its home device whatever happens."""
    prefix = f"{s.adapter.layers}.{index}"
    layer = source.load(prefix)
    step = LayerStep(index, prefix, layer, layer_plan(layer, prefix, s.adapter, s.recipe, s.rules), inputs, fp_inputs,
                     blocks=s.adapter.replay)
    home = _on_device(layer, device)
    try:
        for stage in hooks.before_solve:
            stage(step, device)
        solve_layer(step, s.adapter, device, progress, hooks.calibrate)
        for stage in hooks.observe:
            stage(step, device)
        for stage in hooks.after_solve:
            step.replay = None  # the stage may change what the recorded sub-blocks computed
            stage(step, device)
        if inputs is not None and (not last or s.head_recipe is not None):
            layer_outputs(step, device)
    finally:
        layer.to(home)
        step.fp_layer = step.fp_replay = None
    return step


def _calib_dict(calibration: CalibrationConfig | dict[str, Any]) -> dict[str, Any]:
    cfg = calibration if isinstance(calibration, CalibrationConfig) else CalibrationConfig(**calibration)
    return cfg.model_dump(mode="json")


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
) -> RunReport:
    """Quantize a causal LM and return the run's report.

    ``model`` is a transformers model object (quantized in place), a local model directory (``config.json``
    + safetensors weights, read one decoder layer at a time in ``dtype``; ``output`` is then required), or a
    :class:`~bpdq.pipeline.source.ModelSource`.
    With ``output`` the checkpoint is written there as the run goes (shards of at most ``max_shard_size``),
    appearing atomically at the end. ``calibration`` may be left out when no solver needs a Hessian (RTN):
    the run is then data-free. ``offload`` (bytes or a size such as ``"2GB"``; default: the calibration
    config's ``offload``) keeps calibration activations beyond that budget in a temporary directory on disk.

    The 2-bit levers (off by default; see docs/method.md): ``asymmetric`` (default: the calibration config's
    ``asymmetric``) fits each linear to the full-precision model's outputs; ``tuning`` (a
    :class:`~bpdq.tuning.TuningOptions` or its dict) tunes each layer's coefficients against them;
    ``target_bpw`` chooses 1..4 planes per decoder linear (bitplane grid; at least 2 when the target allows
    every linear 2) to meet that average. Their entries
    appear in the report (``asymmetric``, ``tuning``, ``allocation``). ``autocast`` (default: the calibration
    config's ``autocast``, else ``"none"``) is the compute dtype of the calibration passes' forwards:
    ``none``, ``bfloat16``, ``float16`` or ``auto`` (see :class:`~bpdq.config.CalibrationConfig`); the report's
    ``calibration`` entry says which one ran.

    ``resume`` (``"auto"``, ``"never"``, ``"required"``; needs ``output``; default ``None``: no state kept)
    keeps the run's state beside the output after each decoder layer and continues a run interrupted with
    the same fingerprint (see :mod:`bpdq.pipeline.resume`): ``auto`` resumes when a state is there, ``never``
    removes it first, ``required`` refuses to start without one. A resumed run writes the same checkpoint
    bytes as an uninterrupted one. (With a model object in memory, the layers finished before the resume are
    restored into it from the state.)

    Inside an initialised ``torch.distributed`` group of several processes (e.g. under ``torchrun``) every
    rank calls this with the same arguments: the calibration batches are shared out, the Hessians summed
    over the ranks, and rank 0 writes ``output`` and shows the progress (see
    :mod:`bpdq.pipeline.distributed`).
    """
    from bpdq.allocation import check_target_bpw
    from bpdq.tuning import TuningOptions

    recipe, rules = as_recipe(recipe), as_rules(rules)
    dev = resolve_device(device)
    config = None
    if isinstance(calibration, (CalibrationConfig, dict)):
        config = calibration if isinstance(calibration, CalibrationConfig) else CalibrationConfig(**calibration)
    if offload is None and config is not None:
        offload = config.offload
    if asymmetric is None:
        asymmetric = config.asymmetric if config is not None else False
    if not isinstance(asymmetric, bool):
        raise TypeError(f"asymmetric must be True or False, got {asymmetric!r}")
    if autocast is None:
        autocast = config.autocast if config is not None else "none"
    autocast = resolve_autocast(autocast, dev)  # checked (the allowed values in its error) before any work
    if tuning is not None and not isinstance(tuning, TuningOptions):
        if not isinstance(tuning, dict):
            raise TypeError(f"tuning must be a TuningOptions, a dict or None, got {type(tuning).__name__}")
        tuning = TuningOptions.model_validate(tuning)
    if target_bpw is not None:
        check_target_bpw(target_bpw, recipe.group_size)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if resume is not None and output is None:
        raise ValueError("resume needs output= (the state is kept beside the checkpoint directory)")
    state = ResumeState(output, resume) if resume is not None else None
    if isinstance(model, ModelSource):
        source: ModelSource = model
        if output is None and isinstance(model, LazySource):
            raise ValueError("quantizing a model directory needs output= (the checkpoint is written as the run goes)")
    elif isinstance(model, (str, Path)):
        if output is None:
            raise ValueError("quantizing a model directory needs output= (the checkpoint is written as the run goes)")
        source = LazySource(model, dtype)
        if tokenizer is None:
            tokenizer = _directory_tokenizer(Path(model).expanduser())
    elif isinstance(model, nn.Module):
        if dtype is not None:
            raise ValueError("dtype applies to a model directory; cast an in-memory model before quantizing it")
        source = InMemorySource(model)
    else:
        raise TypeError(f"model must be an nn.Module or a model directory path, got {type(model).__name__}")
    sink: Sink = InMemorySink() if output is None or distributed.rank() != 0 else CheckpointSink(
        output, tokenizer, overwrite=overwrite, max_shard_size=max_shard_size
    )
    return run_quantization(source, sink, recipe=recipe, rules=rules, tokenizer=tokenizer, calibration=calibration,
               device=dev, progress=progress and distributed.rank() == 0, batch_size=batch_size, offload=offload,
               levers=Levers(asymmetric, tuning), target_bpw=target_bpw, resume=state, autocast=autocast)


def _directory_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        logger.warning("no tokenizer in %s (%s): the checkpoint will have none", directory, exc)
        return None
