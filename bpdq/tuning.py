"""Coefficient tuning: after a decoder layer is quantized, train its coefficients (planes frozen, or with
``learn_planes`` moved through bounded learned offsets) so that the quantized layer's outputs match the
full-precision layer's on the calibration windows.

:func:`tune_layer` swaps every :class:`~bpdq.linear.QuantLinear` of the layer for a temporary differentiable
module (planes unpacked once with :func:`bpdq.bits.unpack_bits`, the dense weight rebuilt from float32
coefficients in each forward), minimises the mean squared error of the layer's output against the given
targets with Adam, and puts the QuantLinears back with the best coefficients found, rounded to fp16 (their
storage precision). Optionally the layer's RMSNorm weights are trained too (in float32, written back in their
dtype). The calibration loss of the fp16-rounded state is measured before training, after every pass over
the batches and after the last step, on ``eval_windows`` batches drawn once by the seed (all of them when
there are fewer); the best state wins (the initial state on ties, so ``lr=0`` or ``steps=0`` change nothing).
A non-finite loss or coefficient ends training; what is written back is always finite.

Cost: one forward and backward of the layer per batch window per step, plus one forward per evaluated window
per evaluation; memory: the layer's planes as uint8 plus its float32 coefficients and Adam state, and the
activations of ``windows_per_step`` windows; with ``learn_planes`` also three bytes per weight (the offset as
an ``int16`` count of steps, the sign of its gradient; four more with ``windows_per_step`` > 1) and a
nearest-level search per forward.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bpdq.bits import codes_to_bits, pack_bits, plane_matrix, unpack_bits
from bpdq.devices import AUTOCAST_DTYPES, Autocast, resolve_autocast
from bpdq.batch import Batch, to_device
from bpdq.linear import QuantLinear
from bpdq.modules import swapped_module
from bpdq.quantized import dequantize_bits

logger = logging.getLogger(__name__)

_FP16_MAX = torch.finfo(torch.float16).max


class TuningOptions(BaseModel):
    """Options of the coefficient-tuning stage (off unless a strategy asks for it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(default=100, ge=0, le=100_000, description="optimizer steps per decoder layer")
    lr: float = Field(default=1e-3, ge=0.0, le=1.0, description="Adam learning rate (relative to nothing: coefficients are ~weight scale)")
    windows_per_step: int = Field(default=1, ge=1, le=4096, description="calibration batches per optimizer step")
    tune_norms: bool = Field(default=False, description="also train the layer's RMSNorm weights")
    autocast: Autocast = Field(
        default="none",
        description="forward dtype of training steps and evaluations under torch.autocast: none (the model's "
        "dtype), bfloat16, float16, or auto (bfloat16 where the device has bf16 matrix units: a CPU with AMX or "
        "AVX512-BF16, a CUDA device that supports it; else none)",
    )
    seed: int = Field(default=0, ge=0, description="order in which batches are drawn")
    eval_windows: int | None = Field(
        default=32, ge=1, le=100_000,
        description="calibration batches (drawn once by the seed) on which the kept state is chosen; null: all of them",
    )
    learn_planes: bool = Field(
        default=False,
        description="also move plane choices: each weight's code is the grid level nearest to its starting value "
        "plus a learned offset (sign-gradient steps, bounded by planes_bound grid steps)",
    )
    planes_lr: float | None = Field(
        default=None, ge=1e-5, le=1.0,
        description="step of the offsets, in grid steps per optimizer step; null: 1 / steps",
    )
    planes_bound: float = Field(
        default=1.0, gt=0.0, le=4.0, description="largest offset, in grid steps (1: a weight can reach its neighbour levels)",
    )

    def fingerprint(self) -> dict[str, Any]:
        """What decides the tuned bits (the plane options only when planes are learned)."""
        data = self.model_dump(mode="json")
        if not self.learn_planes:
            for key in ("learn_planes", "planes_lr", "planes_bound"):
                data.pop(key)
        return data


@dataclass
class TuningResult:
    """What :func:`tune_layer` did to one layer."""

    loss_before: float  # output MSE of the layer as given (on the evaluated batches: see eval_windows)
    loss_after: float  # output MSE of the state written back (<= loss_before)
    steps: int  # optimizer steps taken
    best_step: int  # step after which the kept state was measured (0: the initial state)
    time_s: float
    modules: list[str]
    autocast: str = "none"  # the forward dtype used ("auto" resolved)

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "steps": self.steps,
            "best_step": self.best_step,
            "time_s": self.time_s,
            "modules": list(self.modules),
            "autocast": self.autocast,
        }


class _TunableLinear(nn.Module):
    """Dense weight ``c_0 + sum_i c_i b_i`` per group from planes and trainable coefficients.

    With ``learn_planes`` the planes are not frozen: each weight's code is the grid level nearest to
    ``w + v * s`` (``w`` the weight its starting planes give with the current coefficients, ``s`` its group's
    starting mean level spacing, ``v`` an offset bounded by ``bound``) and gradients reach ``v`` straight
    through the rounding. ``v`` moves by sign-gradient steps of ``lr``, so it is kept as a count of steps
    (``int16``, or ``int32`` when ``bound / lr`` needs it) and only the sign of its gradient is kept (``int8``;
    a float32 sum over the windows of a step when ``accumulate``). At ``v = 0`` the codes are the starting
    planes (up to levels of equal value).
    """

    def __init__(self, q: QuantLinear, learn_planes: bool = False, bound: float = 1.0, lr: float = 0.01,
                 accumulate: bool = False) -> None:
        super().__init__()
        k, out, inp, g = q.k, q.out_features, q.in_features, q.group_size
        self.shape = (k, out, inp // g, g)
        self.register_buffer("bits", unpack_bits(q.planes).view(self.shape), persistent=False)
        # coeffs [groups, k+1, out] -> [k+1, out, groups, 1]
        self.coeffs = nn.Parameter(q.coeffs.detach().to(torch.float32).permute(1, 2, 0).unsqueeze(-1).contiguous())
        self.bias = q.bias
        self.counts: torch.Tensor | None
        self.lr, self.limit, self.accumulate = lr, math.floor(bound / lr + 1e-9), accumulate
        self._grad: torch.Tensor | None = None  # sign (int8) or float32 sum of the weight's gradient this step
        if learn_planes:
            with torch.no_grad():
                levels = self.levels()
                spread = levels.amax(0) - levels.amin(0)
                self.register_buffer("step", (spread / (2**k - 1)).clamp_min(torch.finfo(torch.float32).tiny), persistent=False)
            dtype = torch.int16 if self.limit <= torch.iinfo(torch.int16).max else torch.int32
            self.register_buffer("counts", torch.zeros(self.bits.shape[1:], dtype=dtype, device=self.bits.device),
                                 persistent=False)
        else:
            self.counts = None

    def levels(self) -> torch.Tensor:
        """The grid levels of every group in code order, ``[2^k, out, groups, 1]``."""
        k = self.shape[0]
        return torch.einsum("qc,c...->q...", plane_matrix(k, device=self.coeffs.device), self.coeffs)

    def codes(self) -> torch.Tensor:
        """Bits ``uint8[k, out, groups, g]`` of the level nearest to ``w + v * step`` (learned planes), ``w``
        the weight the starting planes give with the current coefficients."""
        assert self.counts is not None
        with torch.no_grad():
            target = dequantize_bits(self.bits, self.coeffs).addcmul_(self.counts.to(torch.float32).mul_(self.lr), self.step)
            levels, order = self.levels().squeeze(-1).movedim(0, -1).sort(-1)  # [out, groups, 2^k] ascending
            mids = (levels[..., 1:] + levels[..., :-1]).mul_(0.5)
            rank = torch.zeros(target.shape, dtype=torch.int64, device=target.device)
            for j in range(mids.shape[-1]):  # how many midpoints lie below: the nearest level's rank
                rank += target > mids[..., j : j + 1]
            return codes_to_bits(torch.gather(order, -1, rank), self.shape[0])

    def weight(self) -> torch.Tensor:
        _, out, n_groups, g = self.shape
        if self.counts is None:
            return dequantize_bits(self.bits, self.coeffs).reshape(out, n_groups * g)
        w = dequantize_bits(self.codes(), self.coeffs)
        if w.requires_grad:  # d loss / d v = d loss / d w * step, step > 0: the sign is the weight gradient's
            w.register_hook(self._collect)
        return w.reshape(out, n_groups * g)

    def _collect(self, grad: torch.Tensor) -> None:
        if not self.accumulate:
            self._grad = grad.sign().to(torch.int8)
        elif self._grad is None:
            self._grad = grad.detach().to(torch.float32, copy=True)
        else:
            self._grad.add_(grad)

    def sign_step(self) -> None:
        """One sign-gradient step of the offsets, clamped to the bound."""
        if self.counts is None or self._grad is None:
            return
        with torch.no_grad():
            sign = self._grad if self._grad.dtype == torch.int8 else self._grad.sign().to(torch.int8)
            self.counts.sub_(sign).clamp_(-self.limit, self.limit)
        self._grad = None

    def stored_planes(self) -> torch.Tensor | None:
        """The learned planes in QuantLinear layout (packed), or None when the planes are frozen."""
        if self.counts is None:
            return None
        k, out, n_groups, g = self.shape
        return pack_bits(self.codes().reshape(k, out, n_groups * g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight()
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        bias = self.bias.to(dtype) if self.bias is not None else None
        return nn.functional.linear(x.to(dtype), w.to(dtype), bias)

    def stored(self) -> torch.Tensor:
        """The coefficients in QuantLinear layout, fp16."""
        return self.coeffs.detach().squeeze(-1).permute(2, 0, 1).to(torch.float16).contiguous()


def tune_layer(
    layer: nn.Module,
    batches: Sequence[Batch],
    targets: Sequence[torch.Tensor],
    options: TuningOptions | dict[str, Any] | None = None,
    *,
    device: torch.device | str | None = None,
) -> TuningResult:
    """Tune the coefficients (and optionally the norms) of ``layer``'s QuantLinears in place.

    ``batches`` are the layer's inputs (hidden states + positional and keyword arguments, as the layer loop
    keeps them), ``targets`` the full-precision layer's outputs for the same batches. ``device``: where to
    compute (default: where the layer's buffers are).
    """
    opts = options if isinstance(options, TuningOptions) else TuningOptions.model_validate(options or {})
    if len(batches) != len(targets) or not batches:
        raise ValueError(f"need one target per batch and at least one batch, got {len(batches)} batches, {len(targets)} targets")
    for i, (b, t) in enumerate(zip(batches, targets)):
        if tuple(t.shape) != tuple(b.hidden.shape):
            raise ValueError(f"target {i} has shape {tuple(t.shape)}, its batch's hidden states {tuple(b.hidden.shape)}")
    quantized = [(n, m) for n, m in layer.named_modules() if isinstance(m, QuantLinear)]
    if not quantized:
        raise ValueError("the layer has no QuantLinear modules to tune; quantize it first")
    dev = torch.device(device) if device is not None else next(iter(layer.buffers())).device
    if opts.autocast == "auto":
        opts = opts.model_copy(update={"autocast": resolve_autocast(opts.autocast, dev)})
    start = time.perf_counter()
    planes_lr = opts.planes_lr if opts.planes_lr is not None else 1.0 / max(opts.steps, 1)
    tunables = {n: _TunableLinear(m, opts.learn_planes, opts.planes_bound, planes_lr, opts.windows_per_step > 1).to(dev)
                for n, m in quantized}
    norms = [m for _, m in layer.named_modules() if type(m).__name__.endswith("RMSNorm")] if opts.tune_norms else []
    with ExitStack() as stack:
        stack.enter_context(_frozen(layer))
        for name, module in tunables.items():
            stack.enter_context(swapped_module(layer, name, module))
        masters = [stack.enter_context(_float_weight(n)) for n in norms]
        params = [t.coeffs for t in tunables.values()] + masters
        for p in params:
            p.requires_grad_(True)
        chosen = _eval_subset(len(batches), opts)
        def evaluate() -> float:
            return _loss(layer, [batches[i] for i in chosen], [targets[i] for i in chosen], dev, opts, tunables.values())

        best_loss = before = evaluate()
        best = _snapshot(tunables, masters)
        best_step = steps = 0
        if opts.steps and opts.lr > 0 and math.isfinite(before):
            optim = torch.optim.Adam(params, lr=opts.lr)
            order = _order(len(batches), opts)
            per_pass = math.ceil(len(batches) / opts.windows_per_step)
            for steps in range(1, opts.steps + 1):
                ok = _step(layer, batches, targets, next(order), dev, opts, optim, params)
                for t in tunables.values():
                    t.sign_step()
                if not ok:
                    logger.warning("coefficient tuning stopped at step %d: non-finite loss or coefficients", steps)
                    break
                if steps % per_pass == 0 or steps == opts.steps:
                    loss = evaluate()
                    if math.isfinite(loss) and loss < best_loss:
                        best_loss, best, best_step = loss, _snapshot(tunables, masters), steps
    coeffs_best, planes_best, norms_best = best
    for (_, q), c, planes in zip(quantized, coeffs_best, planes_best):
        # through load_state_dict, so that the QuantLinear drops kernel repacks of the old coefficients
        state = {"coeffs": c.to(q.coeffs.device)}
        if planes is not None:
            state["planes"] = planes.to(q.planes.device)
        q.load_state_dict(state, strict=False)
    for norm, w in zip(norms, norms_best):
        with torch.no_grad():
            norm.weight.copy_(w.to(norm.weight.dtype))
    result = TuningResult(before, best_loss, steps, best_step, time.perf_counter() - start, [n for n, _ in quantized],
                          opts.autocast)
    logger.info("tuning: output MSE %.4g -> %.4g in %d steps (%.1fs)", before, best_loss, steps, result.time_s)
    return result


def _eval_subset(n: int, opts: TuningOptions) -> list[int]:
    """The batches the kept state is chosen on: ``eval_windows`` of them drawn by the seed, in order, or all."""
    if opts.eval_windows is None or opts.eval_windows >= n:
        return list(range(n))
    gen = torch.Generator().manual_seed(opts.seed + 1)
    return sorted(torch.randperm(n, generator=gen)[: opts.eval_windows].tolist())


def _order(n: int, opts: TuningOptions) -> Iterator[list[int]]:
    """Batches for each step: passes over a seeded permutation, ``windows_per_step`` at a time."""
    gen = torch.Generator().manual_seed(opts.seed)
    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, opts.windows_per_step):
            yield perm[i : i + opts.windows_per_step]


def _forward(layer: nn.Module, batch: Batch, device: torch.device, opts: TuningOptions) -> torch.Tensor:
    dtype = AUTOCAST_DTYPES[opts.autocast]
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    with ctx:
        out = layer(batch.hidden.to(device), *to_device(batch.args, device), **to_device(batch.kwargs, device))
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.to(torch.float32)


def _step(layer, batches, targets, idx, device, opts, optim, params) -> bool:
    optim.zero_grad(set_to_none=True)
    for i in idx:
        loss = (_forward(layer, batches[i], device, opts) - targets[i].to(device, torch.float32)).pow(2).mean() / len(idx)
        if not torch.isfinite(loss):
            return False
        loss.backward()
    optim.step()
    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) and float(p.abs().max()) <= _FP16_MAX for p in params)


def _loss(layer, batches, targets, device, opts, tunables) -> float:
    """Mean output MSE over all batches with the coefficients rounded to fp16 (what would be stored)."""
    with torch.no_grad(), _rounded(tunables):
        total = sum(float((_forward(layer, b, device, opts) - t.to(device, torch.float32)).pow(2).mean()) for b, t in zip(batches, targets))
    return total / len(batches)


@contextmanager
def _rounded(tunables) -> Iterator[None]:
    saved = [t.coeffs.detach().clone() for t in tunables]
    for t in tunables:
        t.coeffs.data.copy_(t.coeffs.data.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).to(torch.float32))
    try:
        yield
    finally:
        for t, s in zip(tunables, saved):
            t.coeffs.data.copy_(s)


def _snapshot(tunables: dict[str, _TunableLinear], masters: list[nn.Parameter]):
    """Coefficients (fp16), planes (learned ones decided by the fp16 coefficients, or None) and norm weights."""
    with _rounded(tunables.values()):
        planes = [t.stored_planes() for t in tunables.values()]
    return [t.stored() for t in tunables.values()], planes, [m.detach().clone() for m in masters]


@contextmanager
def _frozen(layer: nn.Module) -> Iterator[None]:
    """No gradient for the layer's own parameters while tuning (restored after)."""
    flags = [(p, p.requires_grad) for p in layer.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield None
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def _float_weight(norm: nn.Module) -> Iterator[nn.Parameter]:
    """A float32 master copy of a norm's weight, used in its place while tuning; the original is restored."""
    original = norm.weight
    master = nn.Parameter(original.detach().to(torch.float32).clone())
    norm.weight = master
    try:
        yield master
    finally:
        norm.weight = original
