"""The built-in quality stages: the full-precision stream, asymmetric calibration and coefficient tuning.

Both quality options read a *full-precision stream*: the inputs each decoder layer receives in the
full-precision model (``LayerStep.fp_inputs``; the first layer's equal the captured inputs), carried beside
the quantized model's inputs. Per layer, :class:`FullPrecisionStream` keeps a full-precision copy of the layer
(one layer's weights on the compute device, beside the layer being quantized); after the solve, the copy's
outputs on the fp inputs become the next layer's fp inputs (``LayerStep.fp_outputs``) and the copy is dropped
(with asymmetric calibration as soon as the last group's passes gave those outputs, before its targets).

- **Asymmetric calibration** (:class:`AsymmetricCalibration`, ``calibration.asymmetric``): for each
  sequential group, the full-precision copy runs on the fp inputs and the partially quantized layer on the
  quantized inputs, batch by batch; each linear's two inputs give ``H_q`` and ``C``
  (:class:`~bpdq.solvers.asymmetric.AsymmetricAccumulator`), the linear's weight is replaced by its target
  ``W~`` (one factorisation of ``H_q`` per shared input:
  :func:`~bpdq.solvers.asymmetric.asymmetric_targets`) and solved with ``H_q`` (:func:`asymmetric_hessians`).
  A linear with fewer outputs than inputs, alone on its input, in a group whose full-precision pass runs to
  the end (``down_proj``) accumulates ``P = W C`` from the copy's own outputs instead
  (:func:`~bpdq.solvers.asymmetric.asymmetric_target_projected`). The module's recorded proxy loss is then
  measured against ``W~``. The output projection (``lm_head``), when quantized, keeps the symmetric Hessian.
- **Coefficient tuning** (:class:`CoefficientTuning`, ``tuning``): :func:`bpdq.tuning.tune_layer` on the
  solved layer with the quantized model's inputs and the full-precision layer's outputs on the fp inputs as
  targets (AutoRound-style: the tuned layer also absorbs the error accumulated by the layers before it).

Cost: twice the calibration activations (``offload`` bounds both streams together), one more layer's
weights on the device, one full-precision forward per batch per sequential group (asymmetric) and per layer
(the fp stream), plus tuning's own cost (see :mod:`bpdq.tuning`). Each forward stops once the group's
linears have their inputs, and a sub-block already finished (the adapter's ``replay``: attention once its
linears are solved) is replayed in both streams from its recorded outputs instead of being run again, as in
the symmetric passes: one more hidden-state stream of recorded outputs per stream while a layer is solved
(on the CPU, in a store like the stream's own, offloaded with it).
The copy never changes, so its sub-block is recorded in the pass of the block's last linears already (that
pass runs the block to its end: ``o_proj`` in the attention), one pass earlier than in the quantized stream.
"""

from __future__ import annotations

import copy
import functools
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn

from bpdq.batch import Batch
from bpdq.engine import distributed
from bpdq.engine.activations import outputs_like
from bpdq.engine.passes import dense_quantized_forwards, group_inputs, run_layer
from bpdq.engine.replay import Replay
from bpdq.engine.stages import LayerStep, Stage
from bpdq.linear import QuantLinear
from bpdq.report import RunReport
from bpdq.solvers.asymmetric import AsymmetricAccumulator, aligned_rows, corrected_targets, target_factor
from bpdq.tuning import TuningOptions, tune_layer

ASYMMETRIC_DAMP = 0.1  # damping of W~'s solve, relative to mean(diag H_q): calibration.asymmetric_damp's default


def _batch(replay: Replay | None, index: int) -> ContextManager[None]:
    return replay.batch(index) if replay is not None else nullcontext()


def asymmetric_hessians(
    layer: nn.Module, fp_layer: nn.Module, names: Sequence[str], inputs: Sequence[Batch], fp_inputs: Sequence[Batch],
    device: torch.device, damp: float = ASYMMETRIC_DAMP, *, replay: Replay | None = None,
    fp_replay: Replay | None = None, fp_out: Any = None, fp_complete: Sequence[str] = (), group: bool = False,
) -> dict[str, torch.Tensor]:
    """``H_q`` of each linear ``names`` (to solve with), after replacing each one's weight by its asymmetric
    target ``W~`` (in place). Linears that read the very same input (q/k/v, gate/up) share one accumulation.

    ``replay`` (of ``layer``) and ``fp_replay`` (of ``fp_layer``) replay the finished sub-blocks of each
    stream instead of running them again (:class:`~bpdq.engine.replay.Replay`). With ``fp_out`` (a list
    or an :class:`ActivationStore`) the full-precision passes run to the end and ``fp_layer``'s outputs are
    appended to it. ``fp_complete``: sub-blocks of ``fp_layer`` its passes run to their end (see
    :func:`~bpdq.engine.passes.group_inputs`), so that ``fp_replay`` records them in this pass. ``group``: ``names`` are one
    sequential group of the adapter (see :func:`~bpdq.engine.passes.collect_hessians`)."""
    accs, alias = accumulate_asymmetric(layer, fp_layer, names, inputs, fp_inputs, device, replay=replay,
                                        fp_replay=fp_replay, fp_out=fp_out, fp_complete=fp_complete, group=group)
    return asymmetric_targets_of(layer, names, accs, alias, damp)


def accumulate_asymmetric(
    layer: nn.Module, fp_layer: nn.Module, names: Sequence[str], inputs: Sequence[Batch], fp_inputs: Sequence[Batch],
    device: torch.device, *, replay: Replay | None = None, fp_replay: Replay | None = None, fp_out: Any = None,
    fp_complete: Sequence[str] = (), group: bool = False,
    token_weights: Callable[[str, int], torch.Tensor] | None = None, owners: dict[str, set[int]] | None = None,
) -> tuple[dict[str, AsymmetricAccumulator], dict[str, str]]:
    """The passes of :func:`asymmetric_hessians`: its accumulators by the first linear of each shared input,
    and the other linears' aliases to it. In a distributed run the accumulators are summed over the ranks onto
    the ranks that solve their linears (``owners``, default: every rank); on the others they are undefined
    (drop them). ``token_weights(name,
    batch)``: a non-negative weight per token of that batch (``[tokens]``) for the linear's sums, each linear
    then accumulated on its own (see :mod:`bpdq.engine.guided`)."""
    if len(inputs) != len(fp_inputs):
        raise ValueError(f"{len(inputs)} quantized batches but {len(fp_inputs)} full-precision ones")
    accs: dict[str, AsymmetricAccumulator] = {}
    alias: dict[str, str] = {}
    # A linear with fewer outputs than inputs, alone on its input, whose full-precision output the fp pass
    # computes anyway (it runs to the end): ``P = W C`` from that output (see bpdq.solvers.asymmetric).
    project = [n for n in names if fp_out is not None and _projectable(fp_layer.get_submodule(n))]
    with dense_quantized_forwards():
        for i, (b, fb) in enumerate(zip(inputs, fp_inputs)):
            with _batch(replay, i):
                xq = group_inputs(layer, names, b, device, group=group)
            kept: dict[str, torch.Tensor | None] = dict.fromkeys(project)
            with _batch(fp_replay, i):
                xf = group_inputs(fp_layer, names, fb, device, fp_out, fp_complete, keep=kept, group=group)
            for n in names:
                root = n if token_weights is not None else next(
                    o for o in names if xq[o] is xq[n] and xf[o] is xf[n])  # n itself at worst
                if root != n:
                    alias[n] = root
                    continue
                shared = any(xq[o] is xq[n] for o in names if o != n)
                y = kept.get(n) if not shared else None
                q, f = xq[n], xf[n]
                if token_weights is not None:  # sqrt(w_t) on both inputs (and y): w_t on every product
                    s = token_weights(n, i).to(q.device, torch.float32).sqrt()[:, None]
                    d = q.shape[-1]
                    q, f = q.reshape(-1, d).float() * s, f.reshape(-1, d).float() * s
                    if y is not None:
                        y = y.reshape(-1, y.shape[-1]).float() * s
                if n not in accs:
                    out_features = layer.get_submodule(n).out_features if y is not None else None
                    accs[n] = AsymmetricAccumulator(layer.get_submodule(n).in_features, device=device,
                                                    out_features=out_features)
                acc = accs[n]
                if acc.out_features is not None and y is None:
                    raise RuntimeError(f"the full-precision pass gave no output of {n} for batch {i}")
                acc.add(q, f, y if acc.out_features is not None else None)
            xq = xf = kept = y = b = fb = q = f = None  # this batch's tensors are not kept while the next batch runs
    for r in (replay, fp_replay):
        if r is not None:
            r.end_pass(len(inputs))
    everyone = set(range(distributed.world_size()))
    dests = [set().union(*(owners[n] for n in names if alias.get(n, n) == key)) if owners is not None else everyone
             for key in accs]
    distributed.reduce_hessians(list(accs.values()), dests)  # the same order on every rank
    for acc in accs.values():
        acc.identical = not distributed.any_rank(not acc.identical)
    return accs, alias


def asymmetric_targets_of(
    layer: nn.Module, names: Sequence[str], accs: dict[str, AsymmetricAccumulator], alias: dict[str, str],
    damp: float = ASYMMETRIC_DAMP, rows: dict[str, tuple[int, int] | None] | None = None,
    prefactors: dict[str, Callable[[torch.Tensor], Any]] | None = None, factors: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor | None]:
    """The second half of :func:`asymmetric_hessians`: each linear's weight replaced by its target, and
    ``H_q`` of each (``accs`` are spent, one at a time). ``rows`` (a distributed run's
    :attr:`~bpdq.engine.stages.LayerStep.rows`): only the rows this rank solves get their target (whole
    blocks of them, computed as in one process), and a linear it does not solve gets neither (``None``).
    ``prefactors`` and ``factors`` (the step's): for a linear whose rows every rank solves, the factorisation
    of ``H_q`` for the targets and the solver's are made on two ranks side by side, and the solver's goes
    into ``factors``."""
    hessians: dict[str, torch.Tensor | None] = {}
    for root in list(accs):  # H_q factorised once for the linears that share it
        acc = accs.pop(root)
        members = [n for n in names if alias.get(n, n) == root]
        spans: dict[str, tuple[int, int]] = {}
        for n in members:
            out, inp = layer.get_submodule(n).weight.shape
            share = rows.get(n, (0, out)) if rows else (0, out)
            if share is not None:
                spans[n] = aligned_rows(share[0], share[1], out, inp)
        mine = [n for n in members if n in spans]
        if not mine:  # another rank solves these linears
            del acc
            continue
        weights = [layer.get_submodule(n).weight.detach()[slice(*spans[n])] for n in mine]
        dev = weights[0].device
        identical = acc.identical
        if identical:  # x_fp == x_q in every batch: W~ = W exactly
            H_q = acc.hessian
        elif acc.out_features is None:  # W D first: D is freed before H_q is made
            corrections = acc.corrections(weights)
            H_q = acc.hessian
        else:  # P - W H_q in P's storage, from the float64 sum: P is freed before H_q is made
            corrections = acc.corrections(weights, rows=spans[mine[0]])
            H_q = acc.hessian
        del acc  # the float64 sums, before the factorisation
        if not identical:
            corrections = [c.to(dev) for c in corrections]
            H_dev, U = H_q.to(dev), None
            ahead = [n for n in mine if n in (prefactors or {})]
            if ahead and factors is not None:  # both factorisations at once, one rank each (every rank takes part)
                U, factors[ahead[0]] = distributed.spread([functools.partial(target_factor, H_dev, damp),
                                                           functools.partial(prefactors[ahead[0]], H_q)])  # type: ignore[index]
            with torch.no_grad():  # each target written into its weight: no [out, in] copy at the stage's peak
                corrected_targets(weights, H_dev, corrections, damp, in_place=True, factor=U)  # type: ignore[arg-type]
            del corrections, H_dev, U
        for n in mine:
            hessians[n] = H_q
    return {n: hessians.get(n) for n in names}


def _projectable(linear: nn.Module) -> bool:
    """A dense linear without bias and with fewer outputs than inputs (its output is ``x W^T``)."""
    return isinstance(linear, nn.Linear) and linear.bias is None and linear.out_features < linear.in_features


class FullPrecisionStream(Stage):
    """Carries the full-precision stream: a full-precision copy of each layer before its solve, whose outputs
    on the fp inputs become the next layer's fp inputs (unless the last group's asymmetric passes gave them)."""

    name = "fp_stream"
    fp_stream = True
    needs_calibration = True

    def before_solve(self, step: LayerStep) -> None:
        if step.fp_inputs is not None:
            step.fp_layer = copy.deepcopy(step.layer)

    def observe(self, step: LayerStep) -> None:
        if step.fp_layer is None or step.fp_inputs is None:
            return
        if step.fp_outputs is None:
            step.fp_outputs = run_layer(step.fp_layer, step.fp_inputs, step.device, step.fp_replay)
        if step.fp_replay is not None:
            step.fp_replay.close()
        step.fp_layer = step.fp_replay = None


class AsymmetricCalibration(Stage):
    """Each decoder linear fitted to the full-precision model's outputs (see the module docstring)."""

    name = "asymmetric"
    provides_hessians = True
    fp_stream = True
    needs_calibration = True

    def __init__(self, *, auto: bool = False, damp: float = ASYMMETRIC_DAMP) -> None:
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0.0 <= damp <= 10.0:
            raise ValueError(f"asymmetric calibration: damp must be a number in [0, 10], got {damp!r}")
        self.auto = auto  # turned on by ``calibration.asymmetric: auto``: left out where it does not apply
        self.damp = float(damp)  # of the targets' solve, relative to mean(diag H_q)

    def fingerprint(self) -> dict[str, Any]:
        return {"damp": self.damp}

    def before_solve(self, step: LayerStep) -> None:
        if step.fp_layer is not None:
            step.fp_replay = Replay(step.fp_layer, like=step.fp_inputs)

    def hessians(self, step: LayerStep, names: list[str], *,
                 token_weights: Callable[[str, int], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Asymmetric Hessians of a group (the linears' weights become their targets ``W~``). A sub-block
        finished in the quantized layer (see ``step.replay``) is replayed in the full-precision copy too: the
        copy never changes, and the group's inputs are not inside the block. ``token_weights``: see
        :func:`accumulate_asymmetric`."""
        assert step.inputs is not None and step.fp_inputs is not None and step.fp_layer is not None
        complete: list[str] = []
        if step.replay is not None and step.fp_replay is not None:
            for block in step.replay.finished:
                step.fp_replay.finish(block)
            # The copy's sub-blocks never change: a block whose last linears are this group's is finished in
            # the copy now, and its passes run it to the end, so the next group replays it in both streams.
            upto = next(i for i, g in enumerate(step.plan) if set(names) <= set(g))
            later = {rel for g in step.plan[upto + 1:] for rel in g}
            for block in step.blocks:
                if block not in step.fp_replay.finished and not any(rel.startswith(f"{block}.") for rel in later):
                    step.fp_replay.finish(block)
                    complete.append(block)
        fp_out = None
        if set(names) <= set(step.plan[-1]):  # the last group: its fp passes also give the fp outputs
            fp_out = outputs_like(step.fp_inputs)
        accs, alias = accumulate_asymmetric(step.layer, step.fp_layer, names, step.inputs, step.fp_inputs, step.device,
                                            replay=step.replay, fp_replay=step.fp_replay, fp_out=fp_out,
                                            fp_complete=complete, group=True, token_weights=token_weights,
                                            owners=step.owners or None)
        if fp_out is not None:  # the copy's last pass is done: it goes before the targets' factorisation
            step.fp_outputs = fp_out
            if step.fp_replay is not None:
                step.fp_replay.close()
            step.fp_layer = step.fp_replay = None
        return asymmetric_targets_of(step.layer, names, accs, alias, self.damp, rows=step.rows,
                                     prefactors=step.prefactors, factors=step.factors)

    def finish(self, report: RunReport) -> None:
        report.asymmetric = {"damp": self.damp}


class _Hidden(Sequence[torch.Tensor]):
    """The hidden states of a batch sequence, read one at a time (an ActivationStore stays on disk)."""

    def __init__(self, batches: Sequence[Batch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        return self.batches[index].hidden


class CoefficientTuning(Stage):
    """Tunes each solved layer's coefficients on the quantized inputs against the full-precision layer's
    outputs (:func:`bpdq.tuning.tune_layer`); ``results`` holds each tuned layer's
    :class:`~bpdq.tuning.TuningResult` as a dict with its ``layer`` prefix."""

    name = "tuning"
    fp_stream = True
    needs_calibration = True
    single_process = True

    def __init__(self, options: TuningOptions) -> None:
        self.options = options
        self.results: list[dict[str, Any]] = []

    def fingerprint(self) -> dict[str, Any]:
        return self.options.fingerprint()

    def state(self) -> dict[str, Any]:
        return {"results": self.results}

    def restore(self, state: dict[str, Any]) -> None:
        self.results = list(state.get("results", []))

    def after_solve(self, step: LayerStep) -> None:
        if step.inputs is None or step.fp_outputs is None:
            return
        if not any(isinstance(m, QuantLinear) for m in step.layer.modules()):
            return  # every linear of the layer is skipped: nothing to tune
        with torch.enable_grad():
            result = tune_layer(step.layer, step.inputs, _Hidden(step.fp_outputs), self.options, device=step.device)
        self.results.append({"layer": step.prefix, **result.to_dict()})

    def finish(self, report: RunReport) -> None:
        report.tuning = self.results
