"""Calibration data through decoder layers one at a time: token windows, layer-0 inputs, Hessians, replay.

``capture_layer_inputs`` runs the model on batches of token windows and stops it, with a forward pre-hook,
at the first decoder layer: what that layer receives (hidden states and keyword arguments: attention mask,
position embeddings...) is kept on the CPU, in the model's dtype. ``run_layer`` feeds the batches through
one layer on the compute device; ``collect_hessians`` accumulates the Hessians of a group of linears in one
pass that stops as soon as every linear of the group has seen its input (in a distributed run, summed over
the ranks: :mod:`bpdq.pipeline.distributed`).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from bpdq.calibration import calibration_windows
from bpdq.config import CalibrationConfig
from bpdq.shards import parse_size
from bpdq.solvers.hessian import HessianAccumulator


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


@dataclass
class Batch:
    hidden: torch.Tensor  # [batch, seq, hidden] on the CPU, model dtype
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class ActivationStore(Sequence[Batch]):
    """Calibration batches whose hidden states stay in memory up to ``budget`` bytes (their dtype unchanged);
    the rest are written to ``directory`` as safetensors files and read back when a pass reaches them. The
    keyword arguments (masks, position embeddings) are shared by every layer and stay in memory."""

    _counter = 0

    def __init__(self, directory: Path, budget: int | str) -> None:
        self.directory = directory
        self.budget = parse_size(budget, "offload")
        self._items: list[Batch | tuple[Path, Batch]] = []
        self._in_memory = 0

    @classmethod
    def from_batches(cls, batches: Sequence[Batch], directory: Path, budget: int | str) -> "ActivationStore":
        store = cls(directory, budget)
        for b in batches:
            store.append(b)
        return store

    def empty_like(self) -> "ActivationStore":
        return ActivationStore(self.directory, self.budget)

    def append(self, batch: Batch) -> None:
        size = batch.hidden.numel() * batch.hidden.element_size()
        if self._in_memory + size <= self.budget:
            self._in_memory += size
            self._items.append(batch)
            return
        from safetensors.torch import save_file

        ActivationStore._counter += 1
        path = self.directory / f"hidden-{ActivationStore._counter:08d}.safetensors"
        save_file({"hidden": batch.hidden.contiguous()}, str(path))
        self._items.append((path, Batch(batch.hidden.new_empty(0), batch.args, batch.kwargs)))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Batch:  # type: ignore[override]
        item = self._items[index]
        if isinstance(item, Batch):
            return item
        from safetensors.torch import load_file

        path, rest = item
        return Batch(load_file(str(path))["hidden"], rest.args, rest.kwargs)

    @property
    def n_offloaded(self) -> int:
        return sum(not isinstance(item, Batch) for item in self._items)

    def close(self) -> None:
        """Delete this store's files (the batches in memory are dropped with the store)."""
        for item in self._items:
            if not isinstance(item, Batch):
                item[0].unlink(missing_ok=True)
        self._items = []


def outputs_like(batches: Sequence[Batch]) -> "ActivationStore | list[Batch]":
    """An empty container for a pass's outputs over ``batches``: a store with the same directory and memory
    budget when ``batches`` is an :class:`ActivationStore`, else a list."""
    return batches.empty_like() if isinstance(batches, ActivationStore) else []


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


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


def capture_layer_inputs(model: nn.Module, first_layer: nn.Module, batches: Sequence[torch.Tensor]) -> list[Batch]:
    """The inputs of ``first_layer`` for every batch of token ids (computed where the embeddings live; nothing
    from the first decoder layer on runs, so those layers may still be on the meta device)."""
    captured: list[Batch] = []
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


class Replay:
    """Records the outputs of finished sub-blocks of one layer and replays them in later passes.

    A sub-block is *finished* once all its linears are quantized and its input depends on nothing that can
    still change (the adapter vouches for that by listing it in ``Adapter.replay``). The pass after
    :meth:`finish` records its output for every batch; the passes after that return the recording instead
    of running the block. A pass that stops before the block ran records nothing, and the next one retries.

    ``tails`` (block -> its last linear, relative to the block: the adapter's ``tails``) lets that recording
    pass skip most of the block: the block's output is its last linear's output, and that linear's input is
    final as soon as the block's other linears are quantized. :meth:`record_tail` asks the next pass (the one
    that calibrates the last linear, which runs the block up to it anyway) to keep that input; the pass after
    :meth:`finish` then runs the real block for the first batch only, checks that the block's output is the
    last linear's output (alone, or in a tuple whose other items are ``None``) computed from the recorded
    input, and builds the other batches' outputs as ``tail(recorded input)``: for the attention block, one
    ``o_proj`` instead of q/k/v, rotary embeddings, attention and ``o_proj``. If the check fails the block
    is recorded by running it, as without a tail. A kept input is dropped once its output is recorded.
    """

    def __init__(self, layer: nn.Module, tails: dict[str, str] | None = None) -> None:
        self.layer = layer
        self.tails = dict(tails or {})
        self._pending: dict[str, list[Any]] = {}
        self._ready: dict[str, list[Any]] = {}
        self._tail_inputs: dict[str, list[torch.Tensor | None]] = {}  # block -> the tail's input per batch
        self._recording: set[str] = set()  # blocks whose tail inputs are being recorded
        self._template: dict[str, tuple[int, int] | None] = {}  # block -> (tuple length, slot) or None (plain)

    def finish(self, name: str) -> None:
        if name not in self._ready:
            self._pending.setdefault(name, [])

    def record_tail(self, name: str) -> None:
        """Keep the input of ``name``'s tail linear in the next passes (until one pass gives it for every
        batch). The caller vouches that the block's other linears are quantized (the tail may still change)."""
        if name in self.tails and name not in self._ready and name not in self._tail_inputs:
            self._recording.add(name)
            self._tail_inputs[name] = []

    @property
    def finished(self) -> tuple[str, ...]:
        """The sub-blocks declared finished (recorded or waiting for a pass that runs them)."""
        return (*self._ready, *self._pending)

    def _tail(self, name: str) -> nn.Module:
        return self.layer.get_submodule(f"{name}.{self.tails[name]}")

    @contextmanager
    def batch(self, index: int) -> Iterator[None]:
        with ExitStack() as stack:
            for name, outputs in self._ready.items():
                module = self.layer.get_submodule(name)
                stack.enter_context(_replaced_forward(module, outputs[index]))
            for name in self._recording:
                inputs = self._tail_inputs[name]
                if len(inputs) == index:
                    hook = self._tail(name).register_forward_pre_hook(
                        lambda _m, args, i=inputs: i.append(args[0].detach()), prepend=True)  # before a hook that stops the pass
                    stack.callback(hook.remove)
            for name, outputs in self._pending.items():
                if len(outputs) != index:
                    continue
                module = self.layer.get_submodule(name)
                hook = module.register_forward_hook(lambda _m, _a, out, o=outputs: o.append(out))
                stack.callback(hook.remove)
                if name in self._tail_inputs and name not in self._recording:
                    stack.enter_context(self._from_tail(name, module, index))
            yield

    @contextmanager
    def _from_tail(self, name: str, module: nn.Module, index: int) -> Iterator[None]:
        """Batch ``index`` of ``name``'s recording pass: the first batch runs the block and checks the tail's
        claim (see the class docstring), the others apply the tail to its recorded input."""
        inputs, tail = self._tail_inputs[name], self._tail(name)
        if index > 0 and name in self._template:
            template, x = self._template[name], inputs[index]
            assert x is not None
            inputs[index] = None  # the output recorded from it replaces it
            with _replaced_forward_fn(module, lambda *_a, **_k: _fill(template, tail(x))):
                yield
            return
        seen: dict[str, Any] = {}
        pre = tail.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0]))
        post = tail.register_forward_hook(lambda _m, _a, out: seen.__setitem__("y", out))
        check = module.register_forward_hook(lambda _m, _a, out: self._learn(name, inputs, seen, out))
        try:
            yield
        finally:
            for h in (pre, post, check):
                h.remove()

    def _learn(self, name: str, inputs: list[torch.Tensor | None], seen: dict[str, Any], out: Any) -> None:
        x, y = seen.get("x"), seen.get("y")
        template: tuple[int, int] | None | str = "none"
        if y is not None and out is y:
            template = None
        elif y is not None and isinstance(out, tuple):
            slots = [i for i, o in enumerate(out) if o is y]
            if len(slots) == 1 and all(o is None for i, o in enumerate(out) if i != slots[0]):
                template = (len(out), slots[0])
        x0 = inputs[0] if inputs else None
        if template == "none" or x is None or x0 is None or x.shape != x0.shape or not torch.equal(x, x0):
            self._drop_tail(name)  # the claim does not hold: record the block by running it
            return
        self._template[name] = template  # type: ignore[assignment]
        inputs[0] = None

    def _drop_tail(self, name: str) -> None:
        self._tail_inputs.pop(name, None)
        self._recording.discard(name)
        self._template.pop(name, None)

    def end_pass(self, n_batches: int) -> None:
        for name in list(self._recording):
            if len(self._tail_inputs[name]) == n_batches:
                self._recording.discard(name)
            else:
                self._tail_inputs[name] = []
        for name in list(self._pending):
            if len(self._pending[name]) == n_batches:
                self._ready[name] = self._pending.pop(name)
                self._drop_tail(name)
            else:
                self._pending[name] = []
                if name in self._template:  # recorded inputs were used up: record the block by running it
                    self._drop_tail(name)


def _fill(template: tuple[int, int] | None, value: torch.Tensor) -> Any:
    if template is None:
        return value
    length, slot = template
    return tuple(value if i == slot else None for i in range(length))


@contextmanager
def _replaced_forward(module: nn.Module, output: Any) -> Iterator[None]:
    module.forward = lambda *args, **kwargs: output  # instance attribute shadows the class's forward
    try:
        yield
    finally:
        del module.forward


#: The dense weights of :func:`dense_quantized_forwards`'s innermost scope, per QuantLinear; None outside one.
_DENSE: ContextVar[dict[int, tuple[tuple[Any, ...], torch.Tensor]] | None] = ContextVar("bpdq_dense", default=None)


@contextmanager
def dense_quantized_forwards() -> Iterator[None]:
    """One calibration pass's scope (:func:`run_layer`, :func:`collect_hessians` and the levers' passes enter
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
    from bpdq.quantized import dequantize_packed

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
    :func:`collect_hessians`, the levers' passes) runs under ``torch.autocast`` to ``dtype`` (``None``: as it
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
            from bpdq.linear import QuantLinear

            for module in layer.modules():
                if isinstance(module, QuantLinear) and "forward" not in module.__dict__:
                    stack.enter_context(_replaced_forward_fn(module, _dense_forward(module, cache)))
        return layer(batch.hidden.to(device), *to_device(batch.args, device), **to_device(batch.kwargs, device))


@contextmanager
def _replaced_forward_fn(module: nn.Module, forward: Any) -> Iterator[None]:
    module.forward = forward  # instance attribute shadows the class's forward; hooks still run
    try:
        yield
    finally:
        del module.forward


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

            stack.enter_context(_replaced_forward_fn(module, zeros))
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


def collect_hessians(
    layer: nn.Module, names: Sequence[str], batches: Sequence[Batch], device: torch.device, replay: Replay | None = None,
    *, group: bool = False,
) -> dict[str, torch.Tensor]:
    """``H = 2/n sum x x^T`` of the inputs of the linears ``names`` (relative to ``layer``) over all batches.

    Linears called on the very same input tensor (q/k/v, gate/up) share one accumulation. ``group``: the
    linears are one sequential group of an adapter, which do not feed each other, so their products are
    skipped (:func:`skipped_outputs`); otherwise (e.g. every linear of a layer at once) they run.
    """
    modules = {n: layer.get_submodule(n) for n in names}
    accs: dict[str, HessianAccumulator] = {}
    alias: dict[str, str] = {}
    seen: dict[str, torch.Tensor] = {}

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            same = next((other for other, ox in seen.items() if ox is x), None)
            if same is not None:
                alias[name] = alias.get(same, same)
            else:
                accs.setdefault(name, HessianAccumulator(module.in_features, device=device)).add(x)
            seen[name] = x
            if len(seen) == len(modules):
                raise _Stop

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        with dense_quantized_forwards(), skipped_outputs(modules.values() if group else ()):
            for _, b in _passes(batches, replay):
                seen.clear()
                try:
                    _call(layer, b, device)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in accs and n not in alias]
    if missing:
        raise RuntimeError(f"linears {missing} never received an input during calibration")
    for acc in accs.values():  # the same order on every rank of a distributed run
        acc.all_reduce()
    hessians = {key: accs.pop(key).hessian for key in list(accs)}  # each float64 sum dropped once converted
    return {n: hessians[alias.get(n, n)] for n in names}
