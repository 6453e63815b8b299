"""Bit allocation in the run (:class:`BitAllocation`): planes per decoder linear chosen to meet ``target_bpw``.

Before the main loop (the stage's ``setup``), :func:`measure` makes one calibration pass over the *full-precision* model (one decoder
layer materialised at a time, from the run's source): per layer it collects each quantized linear's Hessian
on the full-precision inputs and probes the linear at k = 1..4 planes with :data:`PROBE_SOLVER` over the
module's own bitplane grid and group size, recording the *relative* proxy loss
``tr((W-Q) H (W-Q)^T) / tr(W H W^T)`` (the squared error of the module's output relative to the output). The
absolute loss, used at first, scales with each module's inputs and weights: on SmolLM2 it gave one plane to
41 of 210 linears, mostly in the first layers whose inputs are small, and the model collapsed (perplexity
8.3x full precision at 2.747 bpw against 2.3x for uniform 2 planes at 2.75). A rescaling that leaves the
model's function unchanged (``up_proj`` times c, ``down_proj`` divided by c) leaves the relative losses,
and so the allocation, unchanged (tested). The probe is
GPTQ without refit: one Hessian-aware column sweep (seconds per linear, no alternating iterations), so its
loss ranks plane counts the way the real solver will while costing a fraction of a ``bpdq`` solve.
:func:`bpdq.allocation.allocate_planes` then picks the planes, and :func:`plane_rules` turns them into
exact-name rules placed before the run's own rules (each carrying the module's resolved recipe with its
planes replaced), so the main run solves each module at its allocated planes with its own recipe.

Cost: one extra calibration pass (a forward of every layer on the calibration batches) plus 4 probe solves per
decoder linear. The allocation covers the decoder linears; a quantized ``lm_head`` keeps its rule's planes.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import torch

from bpdq.allocation import MAX_PLANES, MIN_PLANES, Allocation, ModuleLoss, allocate_planes, check_target_bpw
from bpdq.batch import Batch
from bpdq.config import Recipe, Rule
from bpdq.engine.activations import close
from bpdq.engine.passes import collect_hessians, run_layer
from bpdq.engine.plan import RunPlan
from bpdq.engine.source import ModelSource
from bpdq.engine.stages import RunContext, Stage
from bpdq.modules import on_device
from bpdq.quantized import bits_per_weight
from bpdq.report import RunReport
from bpdq.solvers.build import quantize_weight

logger = logging.getLogger(__name__)

PROBE_SOLVER = {"type": "gptq", "refit": "none"}


def check_allocatable(s: RunPlan, target_bpw: float) -> None:
    """``ValueError`` before any work unless every quantized decoder linear can take 1..4 planes at the run's
    group size and ``target_bpw`` is reachable there."""
    check_target_bpw(target_bpw, s.recipe.group_size)
    modules = s.quantized_linears()
    if not modules:
        raise ValueError("target_bpw needs at least one quantized decoder linear; every one is skipped")
    for name, r in modules.items():
        if r.grid.get("type") != "bitplane" or r.group_size != s.recipe.group_size:
            raise ValueError(
                f"target_bpw needs every quantized decoder linear on the 'bitplane' grid at group_size "
                f"{s.recipe.group_size}; {name} has grid {r.grid.get('type')!r} at group_size {r.group_size}"
            )


def measure(source: ModelSource, s: RunPlan, inputs: Sequence[Batch], device: torch.device) -> list[ModuleLoss]:
    """Each quantized decoder linear's proxy loss at 1..4 planes on the full-precision model (see the module
    docstring); the layers are left unchanged and released."""
    results: list[ModuleLoss] = []
    current = inputs
    try:
        for i in range(len(s.layers)):
            prefix = s.prefix(i)
            layer = source.load(prefix)
            names = [(rel, r) for g in s.layer_plan(layer, prefix) for rel, r in g.items() if r is not None]
            home = on_device(layer, device)
            try:
                hessians = collect_hessians(layer, [rel for rel, _ in names], current, device) if names else {}
                for rel, r in names:
                    weight = layer.get_submodule(rel).weight
                    losses = {}
                    for k in range(MIN_PLANES, MAX_PLANES + 1):
                        qw = quantize_weight(weight, hessians[rel], grid=_with_planes(r.grid, k), solver=PROBE_SOLVER, group_size=r.group_size)
                        losses[k] = float(qw.stats.relative_loss or 0.0)
                    results.append(ModuleLoss(f"{prefix}.{rel}", weight.numel(), losses))
                nxt = None
                if i < len(s.layers) - 1:
                    nxt = run_layer(layer, current, device)
            finally:
                layer.to(home)
            source.release(prefix)
            if current is not inputs:
                close(current)
            current = nxt  # type: ignore[assignment]
    finally:
        if current is not inputs:
            close(current)
    return results


def _with_planes(grid: dict, k: int) -> dict:
    out = {**grid, "planes": k}
    if "init_bits" in grid:
        out["init_bits"] = max(k, int(grid["init_bits"]))
    return out


def plane_rules(allocation: Allocation, recipes: dict[str, Recipe]) -> list[Rule]:
    """One exact-name rule per allocated module: its resolved recipe with the allocated planes."""
    rules = []
    for name, k in allocation.planes.items():
        r = recipes[name]
        rules.append(Rule(match=re.escape(name), group_size=r.group_size, grid=_with_planes(r.grid, k), solver=r.solver, kernel=r.kernel))
    return rules


def plane_floor(target_bpw: float, group_size: int) -> int:
    """The fewest planes the allocation gives a module: 2 when the target leaves every module 2 planes, else 1.

    One plane per group costs a linear too much for what the bits buy elsewhere: SmolLM2 at 2.747 bpw with
    15 one-plane linears (and 4 planes for every ``v_proj``) reached 2.49x full-precision perplexity,
    uniform 2 planes at 2.75 bpw 2.33x (``benchmarks/bench_quality.py``). Below ``bpw(2 planes)`` some
    modules must take one plane."""
    return 2 if target_bpw >= bits_per_weight(2, group_size) - 1e-9 else MIN_PLANES


def allocate(source: ModelSource, s: RunPlan, inputs: Sequence[Batch], device: torch.device, target_bpw: float) -> tuple[Allocation, list[Rule]]:
    """Measure, allocate (at least :func:`plane_floor` planes each), and the rules that apply the allocation
    (to put before the run's rules)."""
    recipes = s.quantized_linears()
    losses = measure(source, s, inputs, device)
    floor = plane_floor(target_bpw, s.recipe.group_size)
    allocation = allocate_planes(losses, target_bpw, s.recipe.group_size, min_planes=floor)
    logger.info("%s", allocation)
    return allocation, plane_rules(allocation, recipes)


class BitAllocation(Stage):
    """Chooses 1..4 planes per decoder linear to meet ``target_bpw`` before the loop (see the module
    docstring); its rules and its report are kept in the resume state, so a resumed run does not measure
    again."""

    name = "allocation"
    needs_calibration = True
    single_process = True

    def __init__(self, target_bpw: float) -> None:
        self.target_bpw = target_bpw
        self.saved: dict[str, Any] | None = None

    def fingerprint(self) -> dict[str, Any]:
        return {"target_bpw": self.target_bpw}

    def check(self, plan: RunPlan) -> None:
        check_allocatable(plan, self.target_bpw)

    def state(self) -> dict[str, Any] | None:
        return self.saved

    def restore(self, state: dict[str, Any]) -> None:
        self.saved = state

    def setup(self, run: RunContext) -> None:
        if self.saved is None:
            assert run.inputs is not None
            run.progress.describe("measuring losses for the bit allocation")
            allocation, plane_rules = allocate(run.source, run.plan, run.inputs, run.device, self.target_bpw)
            self.saved = {"rules": [r.model_dump(mode="json") for r in plane_rules], "report": allocation.to_dict()}
        run.add_rules([Rule(**r) for r in self.saved["rules"]])

    def finish(self, report: RunReport) -> None:
        report.allocation = self.saved["report"] if self.saved is not None else None
