"""Calibration passes through one decoder layer: token windows, the first layer's inputs, a layer's outputs,
and the Hessians of a group of linears.

:func:`capture_layer_inputs` runs the model on batches of token windows and stops it, with a forward pre-hook,
at the first decoder layer: what that layer receives (hidden states and keyword arguments: attention mask,
position embeddings...) is kept on the CPU, in the model's dtype. :func:`run_layer` feeds the batches through
one layer on the compute device; :func:`group_inputs` gives the inputs of a group of linears for one batch in
a pass that stops as soon as every linear of the group has seen its input, and :func:`collect_hessians` sums
``x x^T`` of those inputs over the batches (in a distributed run over the ranks too:
:mod:`bpdq.engine.distributed`).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from bpdq.batch import Batch, to_device
from bpdq.calibration import calibration_windows
from bpdq.config import CalibrationConfig
from bpdq.engine import distributed
from bpdq.engine.activations import outputs_like
from bpdq.engine.replay import Replay
from bpdq.linear import QuantLinear
from bpdq.modules import replaced_forward
from bpdq.quantized import dequantize_packed
from bpdq.solvers.hessian import HessianAccumulator


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


def token_windows(tokenizer: Any, calibration: Any, vocab_size: int) -> list[torch.Tensor]:
    """1-D ``int64`` token windows from a calibration config (or dict), or checked from given token ids."""
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


def batch_windows(windows: Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Stack consecutive windows of equal length into ``[b, seq]`` batches of at most ``batch_size``."""
    batches: list[torch.Tensor] = []
    run: list[torch.Tensor] = []
    for w in windows:
        if run and (len(run) == batch_size or run[0].numel() != w.numel()):
            batches.append(torch.stack(run))
            run = []
        run.append(w)
    if run:
        batches.append(torch.stack(run))
    return batches


def _first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_layer_inputs(model: nn.Module, first_layer: nn.Module, batches: Sequence[torch.Tensor], out: Any = None) -> Any:
    """The inputs of ``first_layer`` for every batch of token ids (computed where the embeddings live; nothing
    from the first decoder layer on runs, so those layers may still be on the meta device), appended to
    ``out`` (an :class:`~bpdq.engine.activations.ActivationStore` or a list; by default a new list) as they come."""
    captured = [] if out is None else out
    device = model.get_input_embeddings().weight.device

    def grab(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        cpu = torch.device("cpu")
        captured.append(Batch(hidden.detach().cpu(), to_device(args[1:], cpu), to_device(kwargs, cpu)))
        raise _Stop

    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                continue
            raise RuntimeError("the model's forward never reached its first decoder layer")
    finally:
        handle.remove()
    return captured


#: The dense weights of :func:`dense_quantized_forwards`'s innermost scope, per QuantLinear; None outside one.
_DENSE: ContextVar[dict[int, tuple[tuple[Any, ...], torch.Tensor]] | None] = ContextVar("bpdq_dense", default=None)


@contextmanager
def dense_quantized_forwards() -> Iterator[None]:
    """One calibration pass's scope (:func:`run_layer`, :func:`collect_hessians` and the quality stages' passes enter
    it; nested scopes share the outermost): :func:`_call` runs each already-quantized linear
    (``QuantLinear``) as one dense ``F.linear`` with its dequantized weight, made at its first call and kept
    until its planes or coefficients change or the scope ends. A calibration batch holds thousands of tokens,
    where the inference kernels' tiled path (dequantize a tile, multiply, transpose the output) took a third
    of the time of the layer's linears. The values are those of the ``torch`` reference kernel. The dense
    weights live for one pass only, never while a linear is being solved (the solver's Hessians and copies
    set the run's peak memory), and only of the linears that run in that pass."""
    if _DENSE.get() is not None:
        yield
        return
    cache: dict[int, tuple[tuple[Any, ...], torch.Tensor]] = {}
    token = _DENSE.set(cache)
    try:
        yield
    finally:
        cache.clear()
        _DENSE.reset(token)


def _dense_forward(module: nn.Module, cache: dict[int, tuple[tuple[Any, ...], torch.Tensor]]) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        planes, coeffs = module.planes, module.coeffs
        key = (planes.data_ptr(), planes._version, coeffs.data_ptr(), coeffs._version, x.device, x.dtype)
        hit = cache.get(id(module))
        if hit is None or hit[0] != key:
            hit = cache[id(module)] = (key, dequantize_packed(planes, coeffs, module.group_size).to(x.dtype))
        bias = module.bias.to(x.dtype) if module.bias is not None else None
        return torch.nn.functional.linear(x, hit[1], bias)

    return forward


#: The compute dtype of the calibration forwards (:func:`calibration_autocast`); None: the model's dtype.
_AUTOCAST: ContextVar[torch.dtype | None] = ContextVar("bpdq_calibration_autocast", default=None)


@contextmanager
def calibration_autocast(dtype: torch.dtype | None) -> Iterator[None]:
    """Inside it, every layer forward of a calibration pass (:func:`_call`: :func:`run_layer`,
    :func:`collect_hessians`, the quality stages' passes) runs under ``torch.autocast`` to ``dtype`` (``None``: as it
    is). The layers' outputs are stored in the activations' dtype and the Hessian accumulators multiply in
    their own dtype, whatever the autocast (:class:`~bpdq.solvers.hessian.HessianAccumulator`)."""
    token = _AUTOCAST.set(dtype)
    try:
        yield
    finally:
        _AUTOCAST.reset(token)


def _call(layer: nn.Module, batch: Batch, device: torch.device) -> Any:
    cache = _DENSE.get()
    with ExitStack() as stack:
        dtype = _AUTOCAST.get()
        if dtype is not None:
            stack.enter_context(torch.autocast(device.type, dtype=dtype))
        if cache is not None:
            for module in layer.modules():
                if isinstance(module, QuantLinear) and "forward" not in module.__dict__:
                    stack.enter_context(replaced_forward(module, _dense_forward(module, cache)))
        return layer(batch.hidden.to(device), *to_device(batch.args, device), **to_device(batch.kwargs, device))


@contextmanager
def skipped_outputs(linears: Iterable[nn.Module]) -> Iterator[None]:
    """Inside a pass that stops once every linear of a group has seen its input: each of them returns zeros
    instead of computing its output (hooks still run). The only code that runs between a group's first
    linear and the stop computes the other linears' inputs, and by an adapter's contract the linears of a
    group do not feed each other (q/k/v and gate/up read one input): the ``q_proj`` and ``k_proj`` (and
    ``gate_proj``) products of those passes were never used."""
    with ExitStack() as stack:
        for module in linears:
            out_features = module.out_features

            def zeros(x: torch.Tensor, *_args: Any, n: int = out_features, **_kwargs: Any) -> torch.Tensor:
                return x.new_zeros(*x.shape[:-1], n)

            stack.enter_context(replaced_forward(module, zeros))
        yield


def _passes(batches: Sequence[Batch], replay: Replay | None) -> Iterator[tuple[int, Batch]]:
    """Enumerate the batches of one pass, with ``replay`` active for each batch."""
    for i, b in enumerate(batches):
        if replay is None:
            yield i, b
            continue
        with replay.batch(i):
            yield i, b
    if replay is not None:
        replay.end_pass(len(batches))


def run_layer(
    layer: nn.Module, batches: Sequence[Batch], device: torch.device, replay: Replay | None = None,
    out: Any = None,
) -> Any:
    """``layer``'s outputs for every batch, as the next layer's inputs (same keyword arguments), appended to
    ``out`` (by default a new container like ``batches``: :func:`outputs_like`) and returned."""
    out = outputs_like(batches) if out is None else out
    with dense_quantized_forwards():
        for _, b in _passes(batches, replay):
            hidden = _first_output(_call(layer, b, device))
            out.append(Batch(hidden.detach().to("cpu", b.hidden.dtype), b.args, b.kwargs))
    return out


def group_inputs(
    layer: nn.Module, names: Sequence[str], batch: Batch, device: torch.device, out: Any = None,
    complete: Sequence[str] = (), keep: dict[str, torch.Tensor | None] | None = None, group: bool = False,
) -> dict[str, torch.Tensor]:
    """The input of each linear ``names`` of ``layer`` for one batch (the forward stops once all are seen).
    With ``out`` (a list or an :class:`ActivationStore`) the forward runs to the end instead and the layer's
    output is appended to ``out``, as :func:`run_layer` gives it. A sub-block of
    ``complete`` that is running when the last input is seen runs to its end first (so that a
    :class:`~bpdq.engine.replay.Replay` active around the call records its output). ``keep``: linears
    whose outputs are put in it (those that run in the pass). ``group``: ``names`` are one sequential group
    of the adapter, which do not feed each other: without ``out`` and ``complete``, their products are
    skipped (:func:`skipped_outputs`). Linears called on the very same input (q/k/v, gate/up) get the same
    tensor."""
    seen: dict[str, torch.Tensor] = {}
    running: set[str] = set()

    def make_hook(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            seen[name] = args[0]
            if len(seen) == len(names) and out is None and not running:
                raise _Stop

        return hook

    def enter(block: str) -> Any:
        return lambda _module, _args: running.add(block)

    def leave(block: str) -> Any:
        def hook(_module: nn.Module, _args: tuple[Any, ...], _output: Any) -> None:
            running.discard(block)
            if len(seen) == len(names) and out is None and not running:
                raise _Stop

        return hook

    handles = [layer.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    for n in keep or ():
        handles.append(layer.get_submodule(n).register_forward_hook(
            lambda _m, _a, output, n=n: keep.__setitem__(n, output)))  # type: ignore[union-attr]
    for block in complete:  # registered after the caller's replay hooks: they record before this one stops
        module = layer.get_submodule(block)
        handles += [module.register_forward_pre_hook(enter(block)), module.register_forward_hook(leave(block))]
    try:
        skip = group and out is None and not complete
        with skipped_outputs([layer.get_submodule(n) for n in names] if skip else ()):
            result = _call(layer, batch, device)
        if out is not None:
            out.append(Batch(_first_output(result).detach().to("cpu", batch.hidden.dtype), batch.args, batch.kwargs))
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise RuntimeError(f"linears {missing} never received an input during calibration")
    return seen



def collect_hessians(
    layer: nn.Module, names: Sequence[str], batches: Sequence[Batch], device: torch.device, replay: Replay | None = None,
    *, group: bool = False, owners: dict[str, set[int]] | None = None,
) -> dict[str, torch.Tensor | None]:
    """``H = 2/n sum x x^T`` of the inputs of the linears ``names`` (relative to ``layer``) over all batches
    (:func:`group_inputs` per batch; ``group`` as there), summed over the ranks of a distributed run onto the
    ranks that solve each linear (``owners``, default: every rank gets every Hessian); ``None`` for a linear
    this rank does not solve. Linears called on the very same input tensor (q/k/v, gate/up) share one
    accumulation."""
    accs: dict[str, HessianAccumulator] = {}
    alias: dict[str, str] = {}
    with dense_quantized_forwards():
        for _, b in _passes(batches, replay):
            seen = group_inputs(layer, names, b, device, group=group)
            firsts: dict[int, str] = {}
            for name, x in seen.items():  # in the order the forward reached them
                same = firsts.setdefault(id(x), name)
                if same != name:
                    alias[name] = alias.get(same, same)
                else:
                    accs.setdefault(name, HessianAccumulator(layer.get_submodule(name).in_features, device=device)).add(x)
            seen = x = b = None  # this batch's tensors are not kept while the next batch runs
    everyone = range(distributed.world_size())
    dests = {key: set().union(*(owners[n] for n in names if alias.get(n, n) == key)) if owners is not None
             else set(everyone) for key in accs}
    distributed.reduce_hessians(list(accs.values()), list(dests.values()))  # the same order on every rank
    me = distributed.rank()
    hessians: dict[str, torch.Tensor | None] = {}
    for key in list(accs):  # each float64 sum dropped once converted (at once where this rank owns none)
        acc = accs.pop(key)
        hessians[key] = acc.hessian if me in dests[key] else None
        del acc
    return {n: hessians[alias.get(n, n)] for n in names}
