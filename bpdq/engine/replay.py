"""Replaying finished sub-blocks of a decoder layer from their recorded outputs (see :class:`Replay`)."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from bpdq.batch import Batch
from bpdq.engine.activations import ActivationStore, outputs_like
from bpdq.modules import replaced_forward


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

    The recordings go to the CPU, into an :class:`~bpdq.engine.activations.ActivationStore` per block made
    like ``like`` (the layer's inputs: the same directory and memory budget, so ``calibration.offload``
    bounds them too; in memory without ``like``), and each batch's output comes back to its device only while
    that batch runs. :meth:`close` deletes them (the loop does once the layer's last pass is done).
    """

    def __init__(self, layer: nn.Module, tails: dict[str, str] | None = None, like: Sequence[Batch] | None = None) -> None:
        self.layer = layer
        self.tails = dict(tails or {})
        self._like = like
        self._pending: dict[str, ActivationStore] = {}
        self._ready: dict[str, ActivationStore] = {}
        self._tail_inputs: dict[str, list[torch.Tensor | None]] = {}  # block -> the tail's input per batch
        self._recording: set[str] = set()  # blocks whose tail inputs are being recorded
        self._template: dict[str, tuple[int, int] | None] = {}  # block -> (tuple length, slot) or None (plain)

    def _store(self) -> ActivationStore:
        return outputs_like(self._like) if self._like is not None else ActivationStore()

    def finish(self, name: str) -> None:
        if name not in self._ready and name not in self._pending:
            self._pending[name] = self._store()

    def close(self) -> None:
        """Delete every recording (their files with ``offload``) and kept tail input; nothing is replayed after."""
        for store in (*self._pending.values(), *self._ready.values()):
            store.close()
        self._pending, self._ready = {}, {}
        for name in list(self._tail_inputs):
            self._drop_tail(name)

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
                stack.enter_context(replaced_forward(module, lambda *_a, o=_unpack(outputs[index]), **_k: o))
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
                hook = module.register_forward_hook(lambda _m, _a, out, o=outputs: o.append(_pack(out)))
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
            with replaced_forward(module, lambda *_a, **_k: _fill(template, tail(x))):
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
                self._pending[name].close()
                self._pending[name] = self._store()
                if name in self._template:  # recorded inputs were used up: record the block by running it
                    self._drop_tail(name)


def _pack(out: Any) -> Batch:
    """A sub-block's output as a :class:`Batch` on the CPU: its largest tensor as the hidden states (what an
    :class:`ActivationStore` may offload), the rest of its structure in ``args``."""
    leaves, spec = tree_flatten(out)
    tensors = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    if not tensors:
        return Batch(torch.empty(0), (spec, None, leaves, None), {})
    main = max(tensors, key=lambda i: leaves[i].numel())
    device = leaves[main].device
    rest = [None if i == main else v.detach().to("cpu") if isinstance(v, torch.Tensor) else v for i, v in enumerate(leaves)]
    return Batch(leaves[main].detach().to("cpu"), (spec, main, rest, device), {})


def _unpack(batch: Batch) -> Any:
    """The output :func:`_pack` packed, its tensors back on their device."""
    spec, main, rest, device = batch.args
    leaves = [v.to(device) if isinstance(v, torch.Tensor) else v for v in rest]
    if main is not None:
        leaves[main] = batch.hidden.to(device)
    return tree_unflatten(leaves, spec)


def _fill(template: tuple[int, int] | None, value: torch.Tensor) -> Any:
    if template is None:
        return value
    length, slot = template
    return tuple(value if i == slot else None for i in range(length))


