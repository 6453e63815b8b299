"""Quantizing a sparse layer's fused experts, one expert at a time.

The experts group of a mixture-of-experts layer (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``:
:mod:`bpdq.models.moe`) is calibrated by one pass through the layer, stopped at the experts module: for every
calibration batch it keeps what the experts receive, the hidden states ``x [T, H]`` and the router's top-k
choice ``[T, k]``, computed in the quantized model's stream (the layer's earlier groups are quantized
already). Then, expert by expert:

1. which tokens the expert calibrates on (``calibration`` of its report record): ``"mixed"`` by default, the
   Hessian of the tokens routed to it plus the layer's pooled Hessian (every token's), weighted as
   ``calibration.moe_prior`` tokens per input column; ``"routed"``, its routed tokens alone
   (``moe_prior: 0``); ``"pooled"``, the pooled Hessian alone, for an expert routed fewer than
   ``calibration.moe_min_tokens`` tokens (by default: no token); ``"all"``, every token of the layer, for
   every expert (``calibration.moe_all_experts``);
2. ``gate_up_proj[e]`` is solved with that Hessian of the experts' inputs (gate and up rows share it);
3. ``down_proj[e]`` with the Hessian of its own input ``act(gate) * up``, computed with the quantized
   ``gate_up_proj[e]`` on the same tokens; its pooled part comes from evenly spaced tokens of the layer, at
   about :data:`PRIOR_SAMPLE` per intermediate column (every token for ``"all"``);

and the results go into a :class:`~bpdq.experts.QuantExperts` that replaces the module. Memory beyond the
layer: its captured inputs (one hidden-state stream plus the routing, kept like the layer's activations:
offloaded to disk beyond ``calibration.offload``, then read once per expert and Hessian), one expert's
Hessians (two of each width while its routed and pooled parts are mixed) and its intermediate activations; the
pooled ``gate_up`` Hessian is kept for the layer. Each
expert's record in the report says how it was calibrated (:attr:`~bpdq.report.ModuleRecord.calibration`).
Resume works at layer granularity (a layer's experts are saved together). Under ``torchrun`` the experts are
shared out over the ranks, one per rank at a time (:func:`solve_experts`).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from bpdq.batch import Batch
from bpdq.config import QuantizeConfig, Recipe
from bpdq.engine import distributed
from bpdq.engine.activations import ActivationStore, close, outputs_like
from bpdq.engine.passes import _call, _passes, _Stop, dense_quantized_forwards
from bpdq.engine.replay import Replay
from bpdq.engine.stages import LayerStep
from bpdq.experts import PROJECTIONS, QuantExperts
from bpdq.quantized import dequantize_packed
from bpdq.report import ModuleRecord
from bpdq.solvers.build import build_solver, quantize_weight
from bpdq.solvers.hessian import HessianAccumulator

def is_experts_group(plan: Any, group: dict[str, Any]) -> bool:
    experts = plan.adapter.experts
    return experts is not None and experts.is_experts(list(group))


def fingerprint(plan: Any) -> dict[str, Any]:
    """The mixture-of-experts options a resumed run must share (nothing for a model without experts)."""
    if plan.adapter.experts is None or plan.calibration is None:
        return {}
    return {"moe": {k: getattr(plan.calibration, k) for k in ("moe_all_experts", "moe_min_tokens", "moe_prior")}}


def has_experts(plan: Any) -> bool:
    """Whether a decoder layer of ``plan`` holds a mixture of experts' fused experts."""
    layout = plan.adapter.experts
    return layout is not None and any(layout.module(layer) is not None for layer in plan.layers)


def check(plan: Any, config: QuantizeConfig) -> None:
    """Refuse, before any work, what expert layers do not support: asymmetric calibration, tuning, target_bpw,
    and a rule that skips one of the two fused projections but not the other."""
    if not has_experts(plan):
        return
    layout = plan.adapter.experts
    options = [name for name, on in (("calibration.asymmetric", config.calibration.asymmetric is True),
                                     ("target_bpw", config.target_bpw is not None),
                                     ("tuning", config.tuning is not None)) if on]
    if options:
        raise ValueError(f"{', '.join(options)} {'is' if len(options) == 1 else 'are'} not supported on a mixture of "
                         f"experts ({plan.adapter.architecture}) yet: turn {'it' if len(options) == 1 else 'them'} off")
    for i, layer in enumerate(plan.layers):
        for group in plan.layer_plan(layer, plan.prefix(i)):
            if is_experts_group(plan, group):
                _check_recipes(f"{plan.prefix(i)}.{layout.experts}", group)


def capture_expert_inputs(layer: nn.Module, experts: str, num_experts: int, batches: Sequence[Batch],
                          device: torch.device, replay: Replay | None) -> tuple[ActivationStore, torch.Tensor]:
    """Per batch, the experts module's input ``x [T, H]`` as ``hidden`` and the router's choice
    ``top_k_index [T, k]`` as the only positional argument (the pass stops there), on the CPU, in a container
    like ``batches`` (offloaded beyond the same budget); and how many tokens were routed to each expert."""
    captured = outputs_like(batches)
    counts = torch.zeros(num_experts, dtype=torch.int64)

    def grab(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index") if k in kwargs]
        index = values[1].detach().to("cpu")
        counts.add_(torch.bincount(index.flatten(), minlength=num_experts)[:num_experts])
        captured.append(Batch(values[0].detach().to("cpu"), (index,), {}))
        raise _Stop

    handle = layer.get_submodule(experts).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with dense_quantized_forwards():
            for i, b in _passes(batches, replay):
                try:
                    _call(layer, b, device)
                except _Stop:
                    pass
                if len(captured) != i + 1:
                    raise RuntimeError(f"the experts module {experts!r} never received an input during calibration")
    except BaseException:
        captured.close()
        raise
    finally:
        handle.remove()
    return captured, counts


#: The pooled Hessian of an expert's ``down_proj`` input (its own intermediate activations, which every
#: expert computes differently) comes from about this many tokens per intermediate column, evenly spaced
#: over the layer's tokens.
PRIOR_SAMPLE = 16


def _inputs(captured: Sequence[Batch], expert: int | None, device: torch.device,
            stride: int = 1) -> Iterator[torch.Tensor]:
    """The captured inputs routed to ``expert`` (every input for ``None``, or every ``stride``-th token of
    each batch), batch by batch, on ``device``."""
    for b in captured:
        x = b.hidden[::stride] if expert is None else b.hidden[(b.args[0] == expert).any(dim=-1)]
        yield x.to(device)


def _hessian(xs: Iterable[torch.Tensor], width: int, device: torch.device, owners: set[int] | None = None,
             *, reduce: bool = True) -> Any:
    """The Hessian of ``xs``: with ``reduce``, summed over the ranks onto ``owners`` (all in one process) and
    returned as a matrix (``None`` on other ranks); without, the rank's own accumulator."""
    acc = HessianAccumulator(width, device=device).start()
    for x in xs:
        acc.add(x)
    if not reduce:
        return acc
    if distributed.is_distributed():
        distributed.reduce_hessians([acc], [owners if owners is not None else set(range(distributed.world_size()))])
        if owners is not None and distributed.rank() not in owners:
            return None
    return acc.hessian


def _mix(routed: torch.Tensor, pooled: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * routed + (1 - weight) * pooled``, in ``routed``'s memory (per-token Hessians: the routed
    tokens' share ``weight`` of tokens)."""
    return routed.mul_(weight).add_(pooled, alpha=1.0 - weight)


def solve_experts(step: LayerStep, group: dict[str, Recipe | None], plan: Any, progress: Any,
                  replay: Replay | None) -> list[ModuleRecord]:
    """Quantize the layer's experts group (see the module docstring); the experts module becomes a
    :class:`QuantExperts`. Returns one record per expert and projection.

    In a distributed run each rank captures its own batches' expert inputs; the experts are solved in rounds
    of one expert per rank: each Hessian is reduced onto the expert's rank, which solves it, and the
    quantized ``gate_up_proj`` (needed by every rank for ``down_proj``'s inputs) and ``down_proj`` go to
    every rank. The sums are float64 as in one process, so the result is the same bytes."""
    layout = plan.adapter.experts
    layer, prefix, device = step.layer, step.prefix, step.device
    experts = layout.module(layer)
    recipes = {name.rpartition(".")[2]: r for name, r in group.items()}
    base = f"{prefix}.{layout.experts}"
    num = experts.gate_up_proj.shape[0]
    if all(r is None for r in recipes.values()):
        for name in PROJECTIONS:
            progress.advance()
        return [ModuleRecord(f"{base}.{name}", skipped=True, n_params=getattr(experts, name).numel()) for name in PROJECTIONS]
    _check_recipes(base, group)
    uses_hessian = any(build_solver(dict(r.solver)).requires_hessian for r in recipes.values())
    captured, counts, total = None, torch.zeros(num, dtype=torch.int64), 0
    if uses_hessian:
        progress.describe(f"{prefix}: calibrating {layout.experts}")
        captured, counts = capture_expert_inputs(layer, layout.experts, num, step.inputs, device, replay)
        local = torch.cat([counts, torch.tensor([sum(b.hidden.shape[0] for b in captured)], dtype=torch.int64)])
        both = distributed.all_reduce_counts(local)
        counts, total = both[:-1], int(both[-1])
    calibration = plan.calibration
    all_experts = bool(calibration is not None and calibration.moe_all_experts)
    min_tokens = max(1, calibration.moe_min_tokens or 1) if calibration is not None else 1
    prior = calibration.moe_prior if calibration is not None else 0.0
    hidden, width = experts.gate_up_proj.shape[2], experts.down_proj.shape[2]
    stride = max(1, total // (PRIOR_SAMPLE * width))  # down's pooled part: every stride-th token of each batch
    sources = [None if captured is None else "all" if all_experts else "pooled" if int(counts[e]) < min_tokens
               else "mixed" if prior > 0 else "routed" for e in range(num)]
    ranks = distributed.world_size()
    me = distributed.rank()
    everyone = set(range(ranks))
    pooled: torch.Tensor | None = None
    if any(src in ("pooled", "all", "mixed") for src in sources):  # every rank that owns an expert may need it
        pooled = _hessian(_inputs(captured, None, device), hidden, device, everyone)
    quant: QuantExperts | None = None
    records: list[ModuleRecord] = []
    try:
        for first in range(0, num, ranks):
            round_experts = list(range(first, min(first + ranks, num)))  # expert first + r is solved on rank r
            owner = {e: e - first for e in round_experts}
            start = time.perf_counter()
            progress.describe(f"{base}.{round_experts[0]}" if len(round_experts) == 1 else f"{base}.{round_experts[0]}-{round_experts[-1]}")
            # gate_up: the routed tokens' Hessian of each expert of the round onto its rank, mixed there
            routed = {e: _hessian(_inputs(captured, e, device), hidden, device, reduce=False)
                      for e in round_experts if sources[e] in ("routed", "mixed")}
            _reduce(routed, owner)
            gate_up = {}
            for e in round_experts:
                if owner[e] != me:
                    continue
                hessian = routed.pop(e).hessian if e in routed else None
                if sources[e] == "mixed":
                    hessian = _mix(hessian, pooled, _routed_share(int(counts[e]), prior, hidden))
                elif sources[e] in ("pooled", "all"):
                    hessian = pooled
                gate_up[e] = _solve(experts.gate_up_proj[e], hessian, recipes["gate_up_proj"],
                                    f"{base}.{e}.gate_up_proj", release=sources[e] in ("routed", "mixed"))
                del hessian
            routed.clear()
            gate_up = {e: distributed.share_weight(gate_up.get(e), owner[e]) for e in round_experts}
            # down: its input is the expert's own act(gate) * up, from its quantized gate_up
            accs: dict[tuple[int, str], HessianAccumulator] = {}
            for e in round_experts:
                if sources[e] is None:
                    continue
                qw = gate_up[e]
                w = dequantize_packed(qw.planes, qw.coeffs, qw.group_size).to(device)
                act = functools.partial(_expert_inner, w, experts.act_fn)
                if sources[e] in ("routed", "mixed"):
                    accs[(e, "routed")] = _hessian(map(act, _inputs(captured, e, device)), width, device, reduce=False)
                if sources[e] in ("pooled", "all", "mixed"):
                    every = 1 if sources[e] == "all" else stride
                    accs[(e, "pooled")] = _hessian(map(act, _inputs(captured, None, device, every)), width, device,
                                                   reduce=False)
                del w
            _reduce(accs, {key: owner[key[0]] for key in accs})
            down = {}
            for e in round_experts:
                if owner[e] != me:
                    continue
                inner = None
                if sources[e] == "mixed":
                    inner = _mix(accs.pop((e, "routed")).hessian, accs.pop((e, "pooled")).hessian,
                                 _routed_share(int(counts[e]), prior, width))
                elif sources[e] is not None:
                    inner = accs.pop((e, "routed") if sources[e] == "routed" else (e, "pooled")).hessian
                down[e] = _solve(experts.down_proj[e], inner, recipes["down_proj"], f"{base}.{e}.down_proj", release=True)
                del inner
            accs.clear()
            down = {e: distributed.share_weight(down.get(e), owner[e]) for e in round_experts}
            for e in round_experts:
                qws = {"gate_up_proj": gate_up[e], "down_proj": down[e]}
                if quant is None:
                    quant = QuantExperts.like(experts, {n: {"planes": q.k, "group_size": q.group_size}
                                                        for n, q in qws.items()}, kernel=recipes["gate_up_proj"].kernel)
                for name, qw in qws.items():
                    quant.set_expert(name, e, qw)
                    records.append(ModuleRecord(
                        name=f"{base}.{e}.{name}", skipped=False, n_params=qw.shape[0] * qw.shape[1],
                        recipe=recipes[name].model_dump(mode="json"), bits_per_weight=qw.bits_per_weight,
                        proxy_loss=qw.stats.proxy_loss, relative_loss=qw.stats.relative_loss, time_s=qw.stats.time_s,
                        calibration={"tokens": int(counts[e]), "hessian": sources[e]} if sources[e] is not None else None,
                    ))
            del gate_up, down
            progress.describe(f"{base}.{round_experts[-1]} ({time.perf_counter() - start:.1f}s)")
    finally:
        close(captured)
    assert quant is not None
    layer.set_submodule(layout.experts, quant)
    for _ in PROJECTIONS:
        progress.advance()
    return records


def _routed_share(tokens: int, prior: float, width: int) -> float:
    """The routed tokens' weight in a mixed Hessian: ``tokens`` against the pooled one's ``prior * width``."""
    return tokens / (tokens + prior * width)


def _expert_inner(w: torch.Tensor, act_fn: Any, x: torch.Tensor) -> torch.Tensor:
    """An expert's ``down_proj`` input, ``act(gate) * up``, from its (dequantized) ``gate_up`` weight ``w``."""
    gate, up = torch.nn.functional.linear(x, w.to(x.dtype)).chunk(2, dim=-1)
    return act_fn(gate) * up


def _reduce(accs: dict[Any, HessianAccumulator], owner: dict[Any, int]) -> None:
    """Each accumulator summed over the ranks onto its owner rank (one exchange for all of them); the other
    ranks drop theirs. A no-op in one process."""
    if not distributed.is_distributed():
        return
    keys = list(accs)
    distributed.reduce_hessians([accs[k] for k in keys], [{owner[k]} for k in keys])
    for k in keys:
        if owner[k] != distributed.rank():
            del accs[k]


def _check_recipes(base: str, group: dict[str, Recipe | None]) -> None:
    skipped = [name for name, r in group.items() if r is None]
    if len(skipped) not in (0, len(group)):
        raise ValueError(f"{base}: a rule skips one of {list(PROJECTIONS)} but not the other; the fused experts are "
                         "quantized or kept whole (skip both, or neither)")


def _solve(weight: torch.Tensor, hessian: torch.Tensor | None, recipe: Recipe, name: str, *, release: bool) -> Any:
    try:
        return quantize_weight(weight, hessian, grid=recipe.grid, solver=recipe.solver, group_size=recipe.group_size,
                               release_hessian=release)
    except ValueError as exc:
        raise ValueError(f"cannot quantize {name}: {exc}") from None
