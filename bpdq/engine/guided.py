"""Output-aware Hessians (experimental stage ``guided_hessian``): each calibration token weighted by how much
the model's output depends on the linear's output there, as GuidedQuant does (a Fisher-weighted Hessian).

The layer loop's Hessian of a linear, ``H = 2/n sum_t x_t x_t^T``, treats every token alike. Here each token
``t`` counts with ``w_t = (1 - mix) + mix * g_t / mean(g)``, where ``g_t = ||dL/dy_t||^2`` is the squared
gradient of the model's loss with respect to the linear's output at that token: ``H = 2/n sum_t w_t x_t x_t^T``.
``L`` is the cross-entropy of the full-precision model's own predictions against labels sampled from them
(one label per position, ``seed``): its expected squared gradient is the Fisher information of the output
distribution, and it needs no labels beyond the calibration windows' hidden states.

The gradients come once, before the first layer (:meth:`GuidedHessian.setup`), from the full-precision
model: per calibration batch, a forward pass through the decoder layers keeps each layer's input hidden
state, then the layers are run again one at a time from the last, each backward (``torch.autograd.grad``: no
weight gradient) giving its linears' output gradients and the gradient to pass on (memory: one batch's hidden state per layer, plus one layer's
activations). The token weights of every decoder linear are kept (``n_tokens`` floats each); the Hessians
are then summed from the quantized model's inputs as the loop does, each linear with its own weights (q, k
and v share an input but not a weight).

With ``asymmetric: true`` the same token weights go into asymmetric calibration's sums instead (the
quantized inputs' Hessian and the cross moment with the full-precision inputs, each linear on its own;
see :mod:`bpdq.engine.quality`): use it with ``calibration.asymmetric: false``, as the stage computes the
Hessians either way.

Not a default, and limited to what the experiment needs: the model in memory (no lazy source), one
process, no resume, the head (``lm_head``) keeps the loop's Hessian. Importing this module registers the
stage: ``stages: [guided_hessian]`` (or ``{type: guided_hessian, mix: 0.5}``) with ``--plugin
bpdq.engine.guided``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bpdq.batch import Batch
from bpdq.engine.passes import _call, _first_output, _passes, dense_quantized_forwards, group_inputs
from bpdq.engine.quality import AsymmetricCalibration
from bpdq.engine.source import InMemorySource, return_freed_memory
from bpdq.engine.stages import LayerStep, RunContext, Stage
from bpdq.registry import STAGES
from bpdq.report import RunReport
from bpdq.solvers.hessian import HessianAccumulator


@STAGES.register("guided_hessian")
class GuidedHessian(Stage):
    """Hessians weighted per token by the squared output gradient of each linear (see the module docstring).
    ``mix`` in ``[0, 1]``: 0 gives the loop's Hessian, 1 the gradient weights alone. ``asymmetric``: weight
    asymmetric calibration's sums instead (its targets and Hessians)."""

    provides_hessians = True
    needs_calibration = True
    single_process = True

    def __init__(self, mix: float = 1.0, seed: int = 0, asymmetric: bool = False) -> None:
        if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0.0 <= mix <= 1.0:
            raise ValueError(f"guided_hessian: mix must be a number in [0, 1], got {mix!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"guided_hessian: seed must be an int, got {seed!r}")
        if not isinstance(asymmetric, bool):
            raise ValueError(f"guided_hessian: asymmetric must be true or false, got {asymmetric!r}")
        self.mix = float(mix)
        self.seed = seed
        self.asymmetric = AsymmetricCalibration() if asymmetric else None
        self.fp_stream = asymmetric  # type: ignore[misc]  # the full-precision stream, for asymmetric sums
        #: per decoder linear (full name): one ``[tokens]`` float32 weight vector per calibration batch
        self.weights: dict[str, list[torch.Tensor]] = {}
        self.stats: dict[str, Any] = {}

    def fingerprint(self) -> dict[str, Any]:
        return {"mix": self.mix, "seed": self.seed, "asymmetric": self.asymmetric is not None}

    def restore(self, state: dict[str, Any]) -> None:
        raise ValueError("guided_hessian does not resume a run: its token weights come from the first layer's "
                         "inputs; start the run again (resume: never)")

    def setup(self, run: RunContext) -> None:
        if run.inputs is None:
            raise ValueError("guided_hessian needs calibration data")
        if not isinstance(run.source, InMemorySource):
            raise ValueError("guided_hessian needs the model in memory (not quantized from a directory)")
        model, plan = run.source.model, run.plan
        norm, head = model.get_submodule(plan.adapter.norm), model.get_submodule(plan.adapter.head)
        generator = torch.Generator().manual_seed(self.seed)
        grads: dict[str, list[torch.Tensor]] = {}
        with torch.enable_grad():
            for b in run.inputs:
                self._batch_gradients(plan, norm, head, b, run.device, generator, grads)
                return_freed_memory()  # the batch's freed graphs: glibc keeps them otherwise (GBs per batch)
        for name, per_batch in grads.items():
            mean = torch.cat(per_batch).mean().clamp_min(torch.finfo(torch.float32).tiny)
            self.weights[name] = [(1.0 - self.mix) + self.mix * g / mean for g in per_batch]
        top = [float(torch.cat(g).max() / torch.cat(g).mean()) for g in grads.values()]
        self.stats = {"mix": self.mix, "seed": self.seed, "linears": len(grads),
                      "max_over_mean_gradient": max(top) if top else None}

    def _batch_gradients(self, plan: Any, norm: nn.Module, head: nn.Module, batch: Batch, device: torch.device,
                         generator: torch.Generator, grads: dict[str, list[torch.Tensor]]) -> None:
        layers = plan.layers
        hidden = [batch.hidden]
        with torch.no_grad(), dense_quantized_forwards():
            for layer in layers:
                out = _first_output(_call(layer, Batch(hidden[-1], batch.args, batch.kwargs), device))
                hidden.append(out.detach().to("cpu", batch.hidden.dtype))
        grad = torch.cat([self._top_gradient(norm, head, h.unsqueeze(0), device, generator) for h in hidden[-1]])
        for index in range(len(layers) - 1, -1, -1):
            layer = layers[index]
            prefix = plan.prefix(index)
            names = [rel for g in plan.adapter.linear_groups(layer) for rel in g]
            seen: dict[str, torch.Tensor] = {}
            handles = [layer.get_submodule(rel).register_forward_hook(self._hook(rel, seen)) for rel in names]
            try:
                x = hidden[index].to(device).requires_grad_(True)
                out = _first_output(_call(layer, Batch(x, batch.args, batch.kwargs), device))
                (grad,) = torch.autograd.grad(out, x, grad.to(device, out.dtype))
            finally:
                for h in handles:
                    h.remove()
            for rel in names:
                grads.setdefault(f"{prefix}.{rel}", []).append(seen[rel])
            del x, out

    @staticmethod
    def _top_gradient(norm: nn.Module, head: nn.Module, hidden: torch.Tensor, device: torch.device,
                      generator: torch.Generator) -> torch.Tensor:
        """``dL/dh`` of one window's last hidden state, ``L`` the cross-entropy against labels sampled from the
        model's own predictions."""
        top = hidden.to(device).requires_grad_(True)
        logits = head(norm(top)).float().reshape(-1, head.out_features)
        with torch.no_grad():
            labels = torch.multinomial(torch.softmax(logits, dim=-1).cpu(), 1, generator=generator).squeeze(-1)
        loss = F.cross_entropy(logits, labels.to(logits.device), reduction="sum")
        (grad,) = torch.autograd.grad(loss, top)
        return grad.detach().cpu()

    @staticmethod
    def _hook(rel: str, seen: dict[str, torch.Tensor]) -> Any:
        def record(grad: torch.Tensor) -> None:
            seen[rel] = grad.detach().float().pow(2).sum(-1).reshape(-1).cpu()

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            output.register_hook(record)
        return hook

    def before_solve(self, step: LayerStep) -> None:
        if self.asymmetric is not None:
            self.asymmetric.before_solve(step)

    def _weights(self, step: LayerStep, name: str, batch: int) -> torch.Tensor:
        return self.weights[f"{step.prefix}.{name}"][batch]

    def hessians(self, step: LayerStep, names: list[str]) -> dict[str, torch.Tensor]:
        assert step.inputs is not None
        if self.asymmetric is not None:
            found = self.asymmetric.hessians(step, names, token_weights=lambda n, i: self._weights(step, n, i))
            for n in names:
                self.weights.pop(f"{step.prefix}.{n}", None)  # used once
            return found  # type: ignore[return-value]
        accs = {n: HessianAccumulator(step.layer.get_submodule(n).in_features, device=step.device) for n in names}
        with dense_quantized_forwards():
            for i, b in _passes(step.inputs, step.replay):
                seen = group_inputs(step.layer, names, b, step.device, group=True)
                for n in names:
                    x = seen[n]
                    w = self.weights[f"{step.prefix}.{n}"][i].to(x.device, torch.float32)
                    x2 = x.reshape(-1, x.shape[-1]).float()
                    if x2.shape[0] != w.numel():
                        raise RuntimeError(f"{step.prefix}.{n}: batch {i} has {x2.shape[0]} tokens but "
                                           f"{w.numel()} guided weights")
                    accs[n].add(x2 * w.sqrt()[:, None])
        for n in names:
            self.weights.pop(f"{step.prefix}.{n}", None)  # used once
        return {n: accs[n].hessian for n in names}

    def finish(self, report: RunReport) -> None:
        report.extra[self.name] = {**self.stats, "asymmetric": self.asymmetric is not None}
        if self.asymmetric is not None:
            self.asymmetric.finish(report)
