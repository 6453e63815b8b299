"""What a run will do to a model, decided before any work: its adapter, decoder layers, the recipe of each
linear (the default recipe and the rules, first match wins; ``None`` skips a module), whether the output
projection (``lm_head``) is quantized, and whether any solver needs calibration data."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from bpdq.config import CalibrationConfig, Recipe, Rule, as_recipe, as_rules, resolve_recipe
from bpdq.experts import QuantExperts
from bpdq.kernels.base import check_kernel_device
from bpdq.linear import QuantLinear
from bpdq.models.base import Adapter, get_adapter
from bpdq.solvers.build import build_solver

logger = logging.getLogger(__name__)


@dataclass
class RunPlan:
    """The model's adapter and decoder layers, and how each linear is quantized. ``rules`` may grow before
    the loop (a stage's :meth:`~bpdq.engine.stages.Stage.setup`, e.g. the bit allocation, puts its rules
    first)."""

    recipe: Recipe
    rules: tuple[Rule, ...]
    adapter: Adapter
    layers: nn.ModuleList
    head_recipe: Recipe | None
    calibrated: bool
    #: The run's calibration settings (the mixture-of-experts options are read by :mod:`bpdq.engine.moe`).
    calibration: CalibrationConfig | None = None

    def prefix(self, index: int) -> str:
        return f"{self.adapter.layers}.{index}"

    def layer_plan(self, layer: nn.Module, prefix: str) -> list[dict[str, Recipe | None]]:
        """Each sequential group of ``layer``'s linears with the recipe of each linear (``None`` = skip)."""
        return [{rel: resolve_recipe(f"{prefix}.{rel}", self.recipe, self.rules) for rel in g}
                for g in self.adapter.linear_groups(layer)]

    def quantized_linears(self) -> dict[str, Recipe]:
        """Every quantized decoder linear (full name) with its resolved recipe."""
        out: dict[str, Recipe] = {}
        for i, layer in enumerate(self.layers):
            prefix = self.prefix(i)
            for group in self.layer_plan(layer, prefix):
                out.update({f"{prefix}.{rel}": r for rel, r in group.items() if r is not None})
        return out

    def n_steps(self) -> int:
        """Progress steps of the run: one per decoder linear, plus the head when it is quantized."""
        per_layer = sum(len(g) for g in self.adapter.linear_groups(self.layers[0]))
        return per_layer * len(self.layers) + int(self.head_recipe is not None)


def first_rule(name: str, rules: Sequence[Rule]) -> Rule | None:
    return next((r for r in rules if r.matches(name)), None)


def _check_rules(model: nn.Module, adapter: Adapter, recipe: Recipe, rules: Sequence[Rule], warn: bool) -> None:
    emb = model.get_input_embeddings()
    emb_name = next((n for n, m in model.named_modules() if m is emb), None)
    if emb_name is not None:
        rule = first_rule(emb_name, rules)
        if rule is not None and not rule.skip:
            raise ValueError(
                f"rule {rule.match!r} asks to quantize the embedding {emb_name!r}; bpdq quantizes linears only"
            )
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if adapter.experts is not None:  # a mixture of experts' fused experts, named by their parameters
        linears += [f"{adapter.layers}.{i}.{n}" for i, layer in enumerate(adapter.decoder_layers(model))
                    for g in adapter.linear_groups(layer) if adapter.experts.is_experts(g) for n in g]
    for rule in rules if warn else ():
        if not any(rule.matches(n) for n in linears):
            logger.warning("rule %r matches no linear module of the model", rule.match)
    decoder = [n for n in linears if n.startswith(f"{adapter.layers}.")]
    head_rule = first_rule(adapter.head, rules)
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


def make_plan(model: nn.Module, recipe: Recipe, rules: tuple[Rule, ...], *, warn: bool = True) -> RunPlan:
    """The plan of quantizing ``model``; ``ValueError`` if the model is quantized already or the rules leave
    nothing to quantize. ``warn``: log a warning for each rule that matches no linear."""
    if any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules()):
        raise ValueError("the model already holds QuantLinear modules: it is quantized already")
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    _check_rules(model, adapter, recipe, rules, warn)
    head_rule = first_rule(adapter.head, rules)
    head_recipe = head_rule.apply(recipe) if head_rule is not None else None
    plan = RunPlan(recipe, rules, adapter, layers, head_recipe, calibrated=False)
    recipes = [r for i, layer in enumerate(layers) for g in plan.layer_plan(layer, plan.prefix(i))
               for r in g.values() if r is not None] + ([head_recipe] if head_recipe else [])
    plan.calibrated = any(build_solver(dict(r.solver)).requires_hessian for r in recipes)
    return plan


def check_kernels(plan: RunPlan, device: torch.device) -> None:
    """``ValueError`` if a kernel the plan names cannot run on ``device``: the run calls the quantized layers
    there (the next layer's inputs), and a checkpoint quantized there is first run there."""
    for name in sorted({r.kernel for r in plan.quantized_linears().values()} | (
            {plan.head_recipe.kernel} if plan.head_recipe is not None else set())):
        check_kernel_device(name, device)
