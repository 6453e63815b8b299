"""The layer loop: per decoder layer, materialise -> stages -> calibrate -> solve -> write -> next inputs -> release.

For each decoder layer (moved alone to the compute device) and each sequential group of its linears
(q,k,v -> o -> gate,up -> down): collect the Hessians of the group's inputs, solve every linear with its
recipe, replace the ``nn.Linear`` by a ``QuantLinear``; then rerun the layer so that the next one is
calibrated on the quantized layer's outputs. Recipes come from the plan (:mod:`bpdq.engine.plan`). The output
projection (``lm_head``) is quantized only when a rule matches it; embeddings are never quantized.

The weights come from a :mod:`~bpdq.engine.source` (the model in memory, or a directory of safetensors shards
read one layer at a time) and the results go to a :mod:`~bpdq.engine.sink` (the modules swapped in place,
plus a checkpoint streamed layer by layer). When no module's solver needs a Hessian (e.g. RTN) the run is
data-free: no calibration text, no layer forward, shards in -> packed shards out. :class:`Stage` s
(:mod:`bpdq.engine.stages`) extend every step. With a :class:`~bpdq.engine.resume.ResumeState` the loop saves
each written layer and the next inputs beside the output, restores the layers a previous run finished, and
stops at a layer boundary when a signal asks. Inside a ``torch.distributed`` group the same loop shares the
calibration batches out and sums the Hessians over the ranks (:mod:`bpdq.engine.distributed`).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from typing import Any, Sequence

import torch
from torch import nn

from bpdq.batch import Batch
from bpdq.checkpoint import quantization_config, replace_linears, unique_state_dict
from bpdq.config import QuantizeConfig, Recipe
from bpdq.devices import AUTOCAST_DTYPES, resolve_autocast, resolve_device
from bpdq.engine import distributed, moe
from bpdq.engine.activations import ActivationStore, close
from bpdq.engine.passes import (
    batch_windows,
    calibration_autocast,
    capture_layer_inputs,
    collect_hessians,
    run_layer,
    token_windows,
)
from bpdq.engine.builtin import applicable
from bpdq.engine.plan import RunPlan, check_kernels, make_plan
from bpdq.engine.replay import Replay
from bpdq.engine.interrupt import RunInterrupted, layers_begin, stop_requested
from bpdq.engine.lock import locked_tempdir
from bpdq.engine.resume import ResumeState, source_fingerprint, windows_hash
from bpdq.engine.sink import Sink
from bpdq.engine.source import ModelSource, return_freed_memory
from bpdq.engine.stages import LayerStep, RunContext, Stage, check_stages
from bpdq.linear import QuantLinear
from bpdq.models.base import architecture_of, check_positions, get_adapter
from bpdq.modules import on_device
from bpdq.progress import RunProgress
from bpdq.report import ModuleRecord, RunReport
from bpdq.shards import parse_size
from bpdq.solvers.build import build_solver, quantize_weight
from bpdq.solvers.hessian import HessianAccumulator
from bpdq.version import __version__

logger = logging.getLogger(__name__)


def quantize_linear(
    root: nn.Module, rel: str, full: str, recipe: Recipe, hessian: torch.Tensor | None, *, release_hessian: bool = False,
    split: bool = False, factor: Any = None,
) -> ModuleRecord:
    """Solve the ``nn.Linear`` ``rel`` of ``root`` and swap it for a QuantLinear (on the weight's device);
    ``release_hessian``: as :func:`~bpdq.solvers.build.quantize_weight`'s. ``split``: every rank of a
    distributed run calls this, solves its share of the rows, and all ranks get the whole result
    (:func:`~bpdq.engine.distributed.gather_rows`). ``factor``: the solver's factorisation of ``hessian``,
    made ahead (:attr:`~bpdq.engine.stages.LayerStep.factors`)."""
    linear = root.get_submodule(rel)
    rows = slice(*distributed.row_share(linear.out_features)) if split else slice(None)
    gather = functools.partial(distributed.row_values, rows=linear.out_features) if split else None
    try:
        qw = quantize_weight(
            linear.weight[rows], hessian, grid=recipe.grid, solver=recipe.solver, group_size=recipe.group_size,
            release_hessian=release_hessian, factor=factor, row_gather=gather,
        )
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"cannot quantize {full}: {exc}") from None
    if split:
        qw = distributed.gather_rows(qw, linear.out_features)
    root.set_submodule(rel, QuantLinear.from_quantized(qw, linear.bias, kernel=recipe.kernel))
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


def splittable(recipe: Recipe) -> bool:
    """Whether the recipe's solver may solve a block of a weight's rows alone (``rows_independent``) or with
    the other blocks' per-row values (``rows_gathered``)."""
    solver = build_solver(recipe.solver)
    return solver.rows_independent or solver.rows_gathered


def use_tails(inputs: Sequence[Batch] | None, device: torch.device) -> bool:
    """Whether the layer's passes use the adapter's ``tails`` (:class:`~bpdq.engine.replay.Replay`):
    on a CPU, with the calibration activations in memory (no ``offload``). There the rest of a block
    (attention, the MLP's gate and up) costs far more time than keeping its last linear's input costs memory
    (``down_proj``'s input is ``intermediate / hidden`` times a hidden-state stream: 2.7x on SmolLM2) from
    the pass that calibrates it to the next; on an accelerator the device memory is the constraint."""
    offloaded = isinstance(inputs, ActivationStore) and inputs.offloads
    return inputs is not None and device.type == "cpu" and not offloaded


def solve_layer(step: LayerStep, plan: RunPlan, progress: RunProgress, stages: Sequence[Stage]) -> None:
    """Quantize ``step.layer``'s linears group by group (calibrated on ``step.inputs`` by the stage that
    provides the Hessians or by :func:`~bpdq.engine.passes.collect_hessians`, or Hessian-free in a data-free
    run); sets ``step.records`` and ``step.replay`` (before the first group: the Hessian passes and the
    layer's final pass use it)."""
    layer, prefix, device = step.layer, step.prefix, step.device
    adapter = plan.adapter
    provider = next((s for s in stages if s.provides_hessians), None)
    tails = dict(adapter.tails) if use_tails(step.inputs, device) else {}
    replay = step.replay = Replay(layer, tails, like=step.inputs) if step.inputs is not None else None
    blocks = (*adapter.replay, *(b for b in tails if b not in adapter.replay))
    done: set[str] = set()
    for group in step.plan:
        linears = group
        if moe.is_experts_group(plan, group):  # a mixture of experts' fused experts: solved expert by expert
            step.records += moe.solve_experts(step, group, plan, progress, replay)
            linears = {}
        todo = [rel for rel, r in linears.items() if r is not None]
        if replay is not None:
            for block, tail in tails.items():  # this group's pass reaches the tail: keep its input
                if f"{block}.{tail}" in group and all(
                    rel in done for g in step.plan for rel in g if rel.startswith(f"{block}.") and rel != f"{block}.{tail}"
                ):
                    replay.record_tail(block)
        for rel, r in linears.items():
            if r is None:
                step.records.append(ModuleRecord(f"{prefix}.{rel}", skipped=True, n_params=layer.get_submodule(rel).weight.numel()))
                progress.advance()
        if todo:
            # a linear alone in its group is solved by every rank (a share of its rows each) where its solver
            # allows it; the others each by one owner rank
            split = {rel for rel in todo if len(todo) == 1 and distributed.splits_rows(
                layer.get_submodule(rel).out_features, splittable(group[rel]))}  # type: ignore[arg-type]
            owner = distributed.owners({rel: layer.get_submodule(rel).weight.numel() for rel in todo})
            solvers = {rel: set(range(distributed.world_size())) if rel in split else {owner[rel]} for rel in todo}
            hessians: dict[str, torch.Tensor | None] = dict.fromkeys(todo)
            if distributed.is_distributed():
                step.rows = {rel: distributed.row_share(layer.get_submodule(rel).out_features) if rel in split
                             else (0, layer.get_submodule(rel).out_features) if distributed.rank() in solvers[rel]
                             else None for rel in todo}
                step.owners = solvers
                for rel in split:
                    solver = build_solver(group[rel].solver)  # type: ignore[union-attr]
                    if solver.prefactors:
                        step.prefactors[rel] = functools.partial(solver.prefactor, group_size=group[rel].group_size)  # type: ignore[union-attr]
            if step.inputs is not None:
                progress.describe(f"{prefix}: calibrating {', '.join(todo)}")
                found = provider.hessians(step, todo) if provider is not None else None
                hessians.update(found if found is not None
                                else collect_hessians(layer, todo, step.inputs, device, replay, group=True, owners=solvers))
            solved: dict[str, ModuleRecord] = {}
            for rel in todo:  # in a distributed run, each rank its own linears of the group (or its rows)
                hessian = hessians.pop(rel)
                if distributed.rank() in solvers[rel]:
                    progress.describe(f"{prefix}.{rel}")
                    last = hessian is not None and not any(h is hessian for h in hessians.values())  # q/k/v share one
                    solved[rel] = quantize_linear(layer, rel, f"{prefix}.{rel}", group[rel], hessian,  # type: ignore[arg-type]
                                                  release_hessian=last, split=rel in split, factor=step.factors.pop(rel, None))
            for rel in todo:
                step.records.append(solved[rel] if rel in split else distributed.share_linear(layer, rel, solved.get(rel), owner[rel]))
                progress.advance()
            del hessians
            step.rows, step.owners, step.prefactors, step.factors = {}, {}, {}, {}
            return_freed_memory()  # the group's Hessians and solver copies, before the next group's
        done.update(group)
        if replay is not None:
            for block in blocks:
                if all(rel in done for g in step.plan for rel in g if rel.startswith(f"{block}.")):
                    replay.finish(block)


def run_layer_step(
    source: ModelSource, plan: RunPlan, index: int, inputs: Sequence[Batch] | None, device: torch.device,
    progress: RunProgress, stages: Sequence[Stage], *, last: bool = False, fp_inputs: Sequence[Batch] | None = None,
) -> LayerStep:
    """Materialise decoder layer ``index``, run the stages' ``before_solve``, solve it on ``device``, run
    their ``observe`` and ``after_solve`` and compute its outputs (unless it is the last layer and the head
    is not quantized); the layer ends on its home device whatever happens."""
    prefix = plan.prefix(index)
    layer = source.load(prefix)
    step = LayerStep(index, prefix, layer, plan.layer_plan(layer, prefix), inputs, device, fp_inputs,
                     blocks=plan.adapter.replay)
    home = on_device(layer, device)
    try:
        for stage in stages:
            stage.before_solve(step)
        solve_layer(step, plan, progress, stages)
        for stage in stages:
            stage.observe(step)
        for stage in stages:
            if type(stage).after_solve is not Stage.after_solve:
                if step.replay is not None:  # the stage may change what the recorded sub-blocks computed
                    step.replay.close()
                    step.replay = None
                stage.after_solve(step)
        if inputs is not None and (not last or plan.head_recipe is not None):
            step.outputs = run_layer(step.layer, inputs, device, step.replay)
    finally:
        layer.to(home)
        for replay in (step.replay, step.fp_replay):  # this layer's recordings, before the next layer starts
            if replay is not None:
                replay.close()
        step.fp_layer = step.fp_replay = step.replay = None
    return step


def quantize_head(source: ModelSource, plan: RunPlan, batches: Sequence[Batch] | None, device: torch.device) -> ModuleRecord:
    """Quantize the output projection (calibrated on the final norm of the last layer's outputs); in a
    distributed run rank 0 solves it and shares it with the others."""
    model = source.model
    head = source.load(plan.adapter.head)
    assert plan.head_recipe is not None
    split = distributed.splits_rows(head.out_features, splittable(plan.head_recipe))
    owner = 0
    mine = split or distributed.rank() == owner
    hessian = None
    if batches is not None:
        norm = source.load(plan.adapter.norm)
        acc = HessianAccumulator(head.in_features, device=device)
        home = on_device(norm, device)
        try:
            for b in batches:
                acc.add(norm(b.hidden.to(device)))
        finally:
            norm.to(home)
        distributed.reduce_hessians([acc], [set(range(distributed.world_size())) if split else {owner}])
        hessian = acc.hessian if mine else None
        del acc
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:  # the embedding keeps its dense weight; the head gets its own copy to quantize
        head.weight = nn.Parameter(head.weight.detach(), requires_grad=False)
    home = on_device(head, device)
    try:
        record = None
        if mine:
            record = quantize_linear(model, plan.adapter.head, plan.adapter.head, plan.head_recipe, hessian,
                                     release_hessian=True, split=split)
        if not split:
            record = distributed.share_linear(model, plan.adapter.head, record, owner)
        assert record is not None
    finally:
        model.get_submodule(plan.adapter.head).to(home)
    if tied:
        model.config.tie_word_embeddings = False
    return record


def restore_layer(source: ModelSource, sink: Sink, resume: ResumeState, prefix: str, index: int) -> None:
    """A layer finished before the resume: its QuantLinear modules and tensors from the state, written to the
    sink exactly as they were, then released."""
    table, tensors = resume.layer(index)
    layer = source.model.get_submodule(prefix)
    replace_linears(layer, table)
    layer.load_state_dict(tensors, strict=True, assign=True)
    sink.write_layer(prefix, layer)
    source.release(prefix)


def fingerprint(source: ModelSource, plan: RunPlan, windows: Sequence[torch.Tensor] | None, stages: Sequence[Stage],
                batch_size: int, device: torch.device, autocast: str, calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a resumed run must share with the run that saved the state (see :mod:`bpdq.engine.resume`);
    ``calibration``: how the windows were drawn (named in a refusal beside their hash)."""
    import transformers

    return {
        "model": source_fingerprint(source),
        "calibration_sha256": windows_hash(windows),
        "calibration": calibration,
        "calibration_autocast": autocast,
        "autocast_auto": resolve_autocast("auto", device),  # what a stage's autocast: auto becomes here
        "recipe": plan.recipe.model_dump(mode="json"),
        "rules": [r.model_dump(mode="json") for r in plan.rules],
        "stages": {s.name: s.fingerprint() for s in stages},
        "batch_size": batch_size,
        "device": device.type,
        "versions": {"bpdq": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "world_size": distributed.world_size(),
    } | moe.fingerprint(plan)


def run_quantization(
    source: ModelSource, sink: Sink, config: QuantizeConfig, *, tokenizer: Any = None, stages: Sequence[Stage] = (),
    resume: ResumeState | None = None, windows: Sequence[torch.Tensor] | None = None, calibration_given: bool = True,
) -> RunReport:
    """The loop over ``source``'s decoder layers into ``sink`` (see the module docstring), as ``config`` says,
    with ``stages`` (those of the config included: :func:`bpdq.engine.builtin.config_stages`). ``windows``: token
    windows to calibrate on instead of drawing them from ``config.calibration`` with ``tokenizer``;
    ``calibration_given=False``: the caller has no calibration data (a run that needs it is refused);
    ``resume``: the state to continue from and to keep after each layer (removed once the sink is finished).
    On any exception the layer in work goes back to its home device and ``sink.abort()`` removes what was
    written (the resume state stays). A stop requested by a signal
    (:func:`~bpdq.engine.interrupt.stop_at_layer_boundary`) raises :class:`RunInterrupted` after a layer;
    before the first layer the signal interrupts at once."""
    start = time.perf_counter()
    stages = check_stages(stages)
    model = source.model
    was_training = model.training
    try:
        device = distributed.rank_device(resolve_device(config.device))
        layers = get_adapter(model).layers  # before the run: a quantized model no longer looks Llama-shaped
        autocast = resolve_autocast(config.calibration.autocast, device)
        with calibration_autocast(AUTOCAST_DTYPES[autocast]):
            report = _run(source, sink, config, tokenizer, stages, resume, windows, device, autocast, calibration_given)
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


def preflight(model: nn.Module, config: QuantizeConfig, device: torch.device, *, seq_len: int | None = None,
              warn: bool = True) -> RunPlan:
    """The plan of quantizing ``model`` as ``config`` says on ``device``, and the checks a run makes before
    any work (``ValueError``): rules that leave nothing to quantize, a kernel that cannot run on ``device``,
    calibration windows of ``seq_len`` tokens beyond the model's positions (when a solver needs them).
    Reads no tensor: ``model`` may be a skeleton on the meta device."""
    plan = make_plan(model, config.quantize, tuple(config.rules), warn=warn)
    plan.calibration = config.calibration
    moe.check(plan, config)
    check_kernels(plan, device)
    if plan.calibrated and seq_len is not None:
        check_positions(model, seq_len, "calibration seq_len")
    return plan


def _check(plan: RunPlan, stages: Sequence[Stage]) -> None:
    """The stages' own checks, then what a run of several processes or without data cannot do."""
    for stage in stages:
        stage.check(plan)
    options = {"tuning": "tuning", "allocation": "target_bpw"}  # the built-in stages' config options
    single = [options.get(s.name, f"stage {s.name!r}") for s in stages if s.single_process]
    if single and distributed.is_distributed():
        raise ValueError(f"{' and '.join(single)} {'is' if len(single) == 1 else 'are'} not supported in a distributed run "
                         f"({distributed.world_size()} processes): run them in one process")
    if any(s.needs_calibration for s in stages) and not plan.calibrated:
        raise ValueError("calibration.asymmetric, tuning and target_bpw need calibration data: use a solver that "
                         "uses a Hessian (not only 'rtn')")


def _run(
    source: ModelSource, sink: Sink, config: QuantizeConfig, tokenizer: Any, stages: Sequence[Stage],
    resume: ResumeState | None, windows: Sequence[torch.Tensor] | None, device: torch.device, autocast: str,
    calibration_given: bool = True,
) -> RunReport:
    model = source.model
    calibration = config.calibration
    plan = preflight(model, config, device, seq_len=calibration.seq_len if windows is None and calibration_given else None)
    stages = applicable(stages, plan)
    _check(plan, stages)
    fp_stream = any(s.fp_stream for s in stages)
    report = RunReport(model=architecture_of(model), total_params=sum(p.numel() for p in model.parameters()),
                       stages=[s.name for s in stages])
    if plan.calibrated:
        if not calibration_given:
            raise ValueError("calibration is required: a solver of the recipe needs a Hessian (only 'rtn' runs without data)")
        given = windows is not None
        windows = token_windows(tokenizer, windows if given else calibration, model.get_input_embeddings().num_embeddings)
        check_positions(model, max(w.numel() for w in windows), "calibration seq_len")
        report.calibration = {"windows": len(windows), "seq_len": windows[0].numel()} | (
            {} if given else calibration.model_dump(mode="json")) | {"autocast": autocast}
        drawn = None if given else {k: getattr(calibration, k) for k in ("samples", "seq_len", "seed")}
    else:
        windows, drawn = None, None
        logger.info("no solver of this recipe uses a Hessian: data-free run, the calibration is not used")
    done, first = 0, 0
    n_layers = len(plan.layers)
    if resume is not None:
        done = resume.check(fingerprint(source, plan, windows, stages, calibration.batch_size, device, autocast, drawn),
                            n_layers)
        if done or resume.stage_states:
            for stage in stages:
                saved = resume.stage_states.get(stage.name)
                if saved is not None:
                    stage.restore(saved)
    model.eval()
    layers_prefix = plan.adapter.layers
    # inputs for what is left: a layer, or the head (a state whose every layer is done saved none without one)
    needs_inputs = windows is not None and (done < n_layers or plan.head_recipe is not None)
    with ExitStack() as stack:
        bar = stack.enter_context(RunProgress(n_layers, plan.n_steps(), enabled=config.progress and distributed.rank() == 0 and sys.stderr.isatty()))
        stack.enter_context(torch.no_grad())
        inputs: Sequence[Batch] | None = None
        fp_inputs: Sequence[Batch] | None = None
        if needs_inputs:
            assert windows is not None
            spill, budget = None, None
            if calibration.offload is not None:  # one budget for every activation stream of the run
                spill = stack.enter_context(locked_tempdir("bpdq-activations-"))
                budget = parse_size(calibration.offload, "offload")
            source.load_outside(layers_prefix)
            batches = batch_windows(windows, calibration.batch_size)
            first = distributed.shard_start(len(batches))  # the global number of this rank's first batch
            store = ActivationStore(spill, budget)
            inputs = capture_layer_inputs(model, plan.layers[0], distributed.shard(batches), store)
            source.release_outside(layers_prefix)  # read again after the last layer
            fp_inputs = inputs if fp_stream else None
            if done:
                assert resume is not None
                captured = inputs
                inputs = resume.inputs(captured, "hidden", first, store.empty_like())
                fp_inputs = (resume.inputs(captured, "fp", first, store.empty_like())
                             if fp_stream and done < n_layers else None)
                close(captured)
            if spill is not None:
                logger.info("calibration activations: %d of %d batches offloaded to %s", inputs.n_offloaded,  # type: ignore[union-attr]
                            len(inputs), spill)
        try:
            context = RunContext(source, plan, device, inputs, report, bar)
            for stage in stages:
                stage.setup(context)
            if resume is not None:
                resume.set_stage_states({s.name: s.state() for s in stages})
            if resume is not None and done:
                report.modules += [ModuleRecord(**r) for r in resume.records()]
                restored = [sum(len(g) for g in plan.adapter.linear_groups(plan.layers[i])) for i in range(done)]
                for i in range(done):
                    restore_layer(source, sink, resume, plan.prefix(i), i)
                    for _ in range(restored[i]):
                        bar.advance()
            layers_begin()  # a signal now stops the run at the next layer boundary, its state saved
            for i in range(done, n_layers):
                bar.layer(i)
                prefix = plan.prefix(i)
                step = run_layer_step(source, plan, i, inputs, device, bar, stages, last=i == n_layers - 1,
                                      fp_inputs=fp_inputs)
                report.modules += step.records
                sink.write_layer(prefix, step.layer)
                for stage in stages:
                    stage.after_write(step)
                if resume is not None:
                    resume.save_layer(i, quantization_config(step.layer)["modules"], unique_state_dict(step.layer),
                                      [asdict(r) for r in step.records], {"hidden": step.outputs, "fp": step.fp_outputs},
                                      {s.name: s.state() for s in stages}, first)
                source.release(prefix)
                close(inputs, fp_inputs)
                inputs, fp_inputs = step.outputs, step.fp_outputs
                del step
                if i < n_layers - 1 and distributed.any_rank(stop_requested()):  # after the last, only the write is left
                    raise RunInterrupted(i + 1, n_layers, resume.dir if resume is not None else None)
            if stop_requested():
                logger.warning("stop requested after the last decoder layer: finishing the checkpoint instead")
            source.load_outside(layers_prefix)
            if plan.head_recipe is not None:
                bar.describe(plan.adapter.head)
                report.modules.append(quantize_head(source, plan, inputs, device))
                bar.advance()
        finally:
            close(inputs, fp_inputs)
    for stage in stages:
        stage.finish(report)
    recipes = {m.name: m.recipe for m in report.modules if m.recipe is not None}
    model.config.quantization_config = quantization_config(model, recipes)
    return report
