"""Layer-by-layer calibration helpers (bpdq/engine/passes.py): replaying finished sub-blocks."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

import bpdq
from bpdq.engine import passes as calibrate
from bpdq.batch import Batch
from bpdq.engine.activations import ActivationStore, outputs_like
from bpdq.engine.passes import run_layer
from bpdq.engine.replay import Replay
from bpdq.models.llama import LLAMA
from tests.tiny_models import TINY_CALIBRATION, TINY_RECIPE, tiny_model, tiny_tokenizer


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.second(self.first(x).relu())


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.out = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x + self.block(x))


def test_a_finished_block_is_recorded_once_then_replayed_with_the_same_outputs():
    torch.manual_seed(0)
    layer = Layer()
    batches = [Batch(torch.randn(2, 3, 4), (), {}) for _ in range(3)]
    expected = run_layer(layer, batches, torch.device("cpu"))
    replay = Replay(layer)
    replay.finish("block")
    recorded = run_layer(layer, batches, torch.device("cpu"), replay)  # records
    assert layer.block.calls == 2 * len(batches)
    replayed = run_layer(layer, batches, torch.device("cpu"), replay)  # replays
    assert layer.block.calls == 2 * len(batches), "a replayed block must not run"
    for a, b, c in zip(expected, recorded, replayed):
        assert torch.equal(a.hidden, b.hidden) and torch.equal(a.hidden, c.hidden)
    assert "forward" not in vars(layer.block), "the replay must restore the block's own forward"


class TupleBlock(Block):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:  # as attention blocks return
        return super().forward(x), None


def test_recordings_go_to_a_store_like_the_inputs_offloaded_with_them_and_close_deletes_them(tmp_path):
    torch.manual_seed(0)
    layer = Layer()
    layer.block = TupleBlock()
    layer.forward = lambda x: layer.out(x + layer.block(x)[0])
    batches = ActivationStore.from_batches([Batch(torch.randn(2, 3, 4), (), {}) for _ in range(4)], tmp_path, "100B")
    expected = run_layer(layer, batches, torch.device("cpu"))
    files = set(tmp_path.iterdir())
    replay = Replay(layer, like=batches)
    replay.finish("block")
    # records: the inputs' first batch (96 bytes) fills the budget they share: the recordings go to disk
    run_layer(layer, batches, torch.device("cpu"), replay)
    recorded = set(tmp_path.iterdir()) - files
    assert replay._ready["block"].n_offloaded == 4 and len(recorded) == 4 + 4  # and 4 of run_layer's outputs
    calls = layer.block.calls
    replayed = run_layer(layer, batches, torch.device("cpu"), replay)
    assert layer.block.calls == calls and all(torch.equal(a.hidden, b.hidden) for a, b in zip(expected, replayed))
    replay.close()
    assert not replay.finished and len(set(tmp_path.iterdir()) - files) == 4 + 4  # two passes' outputs: the recordings are gone
    run_layer(layer, batches, torch.device("cpu"), replay)
    assert layer.block.calls == calls + len(batches)  # nothing is replayed after close


def test_each_layers_recordings_are_closed_before_the_next_layer_starts(monkeypatch):
    from bpdq.engine import loop

    made: list[Replay] = []
    closed: set[int] = set()
    init, close, step = Replay.__init__, Replay.close, loop.run_layer_step
    monkeypatch.setattr(Replay, "__init__", lambda self, *a, **k: made.append(self) or init(self, *a, **k))
    monkeypatch.setattr(Replay, "close", lambda self: closed.add(id(self)) or close(self))

    def checked(source, plan, index, *args, **kwargs):
        assert all(id(r) in closed for r in made), f"layer {index} starts with recordings of an earlier layer alive"
        return step(source, plan, index, *args, **kwargs)

    monkeypatch.setattr(loop, "run_layer_step", checked)
    bpdq.quantize_model(tiny_model(layers=3), tiny_tokenizer(), recipe={**TINY_RECIPE, "solver": "gptq"},
                        calibration=TINY_CALIBRATION, progress=False, asymmetric=True)
    assert len(made) == 6 and all(id(r) in closed for r in made)  # per layer: the layer's and its copy's


def test_a_pass_that_stops_before_the_block_records_nothing():
    layer = Layer()
    batches = [Batch(torch.randn(1, 2, 4), (), {}) for _ in range(2)]
    replay = Replay(layer)
    replay.finish("block")
    replay.end_pass(len(batches))  # a pass in which the block never ran
    run_layer(layer, batches, torch.device("cpu"), replay)
    calls = layer.block.calls
    run_layer(layer, batches, torch.device("cpu"), replay)
    assert layer.block.calls == calls


def test_replaying_the_attention_block_gives_the_same_checkpoint(register, monkeypatch):
    """The Llama adapter replays self_attn (fewer attention runs); without replay the tensors are identical."""
    tok = tiny_tokenizer()
    register(bpdq.ADAPTERS, "NoReplayLlama", dataclasses.replace(LLAMA, architecture="NoReplayLlama", replay=(), tails=()))
    attention = type(tiny_model("llama", layers=1).model.layers[0].self_attn)
    real_forward, runs = attention.forward, []

    def counting_forward(self, *args, **kwargs):
        runs[-1] += 1
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(attention, "forward", counting_forward)
    _same_checkpoint_fewer_calls(tok, ("LlamaForCausalLM", "NoReplayLlama"), runs)


def _same_checkpoint_fewer_calls(tok, archs, counter, **kwargs):
    """Quantize a tiny Llama under each architecture name (``counter`` gets one count per run): the first
    run counts fewer calls, and both give the same tensors."""
    states = []
    for arch in archs:
        model = tiny_model("llama", layers=2)
        model.config.architectures = [arch]
        recipe = {**TINY_RECIPE, "solver": {"type": "bpdq", "iters": 2}}
        counter.append(0)
        bpdq.quantize_model(model, tok, recipe=recipe, calibration=TINY_CALIBRATION, progress=False, **kwargs)
        states.append(model.state_dict())
    assert counter[0] < counter[1]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


class TailBlock(nn.Module):
    """A block whose output is its last linear's (``plain``) or not (``shifted``: the check must catch it)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.last = nn.Linear(4, 4)
        self.mode = mode
        self.calls = 0

    def forward(self, x: torch.Tensor) -> Any:
        self.calls += 1
        y = self.last(self.first(x).relu())
        return {"plain": y, "tuple": (y, None), "shifted": y + 1.0, "pair": (y, y)}[self.mode]


class TailLayer(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.block = TailBlock(mode)
        self.out = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return self.out(x + (y[0] if isinstance(y, tuple) else y))


@pytest.mark.parametrize("mode", ["plain", "tuple", "shifted", "pair"])
def test_a_tail_replay_runs_the_block_once_and_gives_the_same_outputs(mode):
    """The tail's recorded input gives the block's output without running it (after one checked batch); a
    block whose output is not its tail's alone is recorded by running it, with the same outputs."""
    torch.manual_seed(0)
    layer = TailLayer(mode)
    batches = [Batch(torch.randn(2, 3, 4), (), {}) for _ in range(4)]
    cpu = torch.device("cpu")
    expected = run_layer(layer, batches, cpu)
    replay = Replay(layer, {"block": "last"})
    replay.record_tail("block")
    run_layer(layer, batches, cpu, replay)  # the pass that calibrates `last` (here: a whole pass) keeps its input
    calls = layer.block.calls
    replay.finish("block")
    recorded = run_layer(layer, batches, cpu, replay)
    ran = layer.block.calls - calls
    assert ran == (1 if mode in ("plain", "tuple") else len(batches))
    replayed = run_layer(layer, batches, cpu, replay)
    assert layer.block.calls - calls == ran, "a recorded block must not run again"
    for a, b, c in zip(expected, recorded, replayed):
        assert torch.equal(a.hidden, b.hidden) and torch.equal(a.hidden, c.hidden)
    assert "forward" not in vars(layer.block)


def test_a_tail_input_recorded_before_the_block_changed_is_not_used():
    """If the block's other linears changed after the tail's input was kept, the first batch's check fails
    and the block is recorded by running it: the outputs are those of the changed block."""
    torch.manual_seed(0)
    layer = TailLayer("plain")
    batches = [Batch(torch.randn(2, 3, 4), (), {}) for _ in range(3)]
    cpu = torch.device("cpu")
    replay = Replay(layer, {"block": "last"})
    replay.record_tail("block")
    run_layer(layer, batches, cpu, replay)
    with torch.no_grad():
        layer.block.first.weight.mul_(0.5)  # breaks the caller's promise
    expected = run_layer(layer, batches, cpu)
    replay.finish("block")
    got = run_layer(layer, batches, cpu, replay)
    for a, b in zip(expected, got):
        assert torch.equal(a.hidden, b.hidden)


def test_tails_and_skipped_products_give_the_same_checkpoint_with_fewer_products(register, monkeypatch):
    """The Llama adapter's tails (o_proj, down_proj) and the products a calibration pass never uses (q, k,
    gate before the stop) are skipped: the checkpoint is bit-identical to the run without tails, and fewer
    linear products run."""
    tok = tiny_tokenizer()
    register(bpdq.ADAPTERS, "NoTailLlama", dataclasses.replace(LLAMA, architecture="NoTailLlama", tails=()))
    real, products = nn.Linear.forward, []

    def counting(self, x):
        products[-1] += 1
        return real(self, x)

    monkeypatch.setattr(nn.Linear, "forward", counting)
    monkeypatch.setattr(calibrate, "_dense_forward", _counted(calibrate._dense_forward, products))
    _same_checkpoint_fewer_calls(tok, ("LlamaForCausalLM", "NoTailLlama"), products, batch_size=2)


def _counted(make, counter):
    def wrapped(module, cache):
        forward = make(module, cache)

        def counting(x):
            counter[-1] += 1
            return forward(x)

        return counting

    return wrapped


def test_a_pass_over_a_store_writes_to_a_store_with_its_budget(tmp_path):
    layer = Layer()
    batches = [Batch(torch.randn(2, 3, 4), (), {}) for _ in range(3)]
    store = ActivationStore(tmp_path, 2 * 3 * 4 * 4)  # room for one batch: the others go to disk
    for b in batches:
        store.append(b)
    out = run_layer(layer, store, torch.device("cpu"))
    # the budget is shared with the inputs, which fill it: every output goes to disk
    assert isinstance(out, ActivationStore) and out.budget == store.budget and out.n_offloaded == 3
    expected = run_layer(layer, batches, torch.device("cpu"))
    assert not expected.offloads and not outputs_like(batches).offloads  # from a list: a store in memory
    for a, b in zip(out, expected):  # a tensor read back from disk may sit at another alignment: last-bit differences
        torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-6, atol=1e-6)
    out.close()
    store.close()


class QuantLayer(nn.Module):
    """A linear already quantized (what a layer step's later passes see) and one still dense."""

    def __init__(self) -> None:
        super().__init__()
        from bpdq.linear import QuantLinear

        torch.manual_seed(0)
        self.q = QuantLinear.from_linear(nn.Linear(64, 48), grid={"type": "uniform", "bits": 2}, group_size=32,
                                         kernel="cpu_lut" if "cpu_lut" in bpdq.KERNELS else "auto")
        self.dense = nn.Linear(48, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.q(x))


def test_dense_forwards_give_the_torch_kernels_values_rebuild_on_new_coefficients_and_end_with_the_scope():
    from bpdq.engine import passes as calibrate

    layer = QuantLayer()
    batches = [Batch(torch.randn(2, 40, 64), (), {}) for _ in range(2)]  # 80 tokens a batch: the tiled path
    cpu = torch.device("cpu")

    def torch_kernel() -> list[torch.Tensor]:
        layer.q.set_kernel("torch")
        try:
            return [b.hidden for b in run_layer(layer, batches, cpu)]
        finally:
            layer.q.set_kernel("auto")

    built = []
    real = calibrate._dense_forward

    def counting(module, cache):
        forward = real(module, cache)
        return lambda x: (built.append(len(cache)), forward(x))[1]

    want = torch_kernel()
    with calibrate.dense_quantized_forwards():
        scope = calibrate._DENSE.get()
        calibrate._dense_forward = counting
        try:
            got = [b.hidden for b in run_layer(layer, batches, cpu)]
            assert all(torch.equal(a, b) for a, b in zip(got, want))  # exactly the reference kernel's values
            assert built == [0, 1] and len(scope) == 1  # one dense weight, made by the first call
            assert "forward" not in vars(layer.q), "the dense forward is only set during a call"
            with torch.no_grad():
                layer.q.coeffs.mul_(0.5)  # in place, as tuning and a distributed broadcast change them
            halved = [b.hidden for b in run_layer(layer, batches, cpu)]
        finally:
            calibrate._dense_forward = real
    assert calibrate._DENSE.get() is None and not scope, "the scope's dense weights must be dropped with it"
    assert all(torch.equal(a, b) for a, b in zip(halved, torch_kernel())), "stale dense weight after new coefficients"
    assert not any(torch.equal(a, b) for a, b in zip(halved, want))
    outside = [b.hidden for b in run_layer(layer, batches, cpu)]  # the layer's own kernel again (may round otherwise)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(outside, halved))


def test_dense_calibration_forwards_change_no_byte_of_a_run_with_the_torch_kernel(monkeypatch):
    """With the ``torch`` kernel (whole-weight dequantization + F.linear) the layers compute the very same values
    outside the dense scope: switching the scope off must give a bit-identical model."""
    import contextlib

    from bpdq.engine import passes as calibrate

    tok = tiny_tokenizer()
    recipe = {**TINY_RECIPE, "solver": {"type": "bpdq", "iters": 2}, "kernel": "torch"}
    states = []
    for dense in (True, False):
        if not dense:
            monkeypatch.setattr(calibrate, "dense_quantized_forwards", contextlib.nullcontext)
        model = tiny_model("llama", layers=2)
        bpdq.quantize_model(model, tok, recipe=recipe, calibration=TINY_CALIBRATION, progress=False)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_calibration_autocast_runs_the_layers_in_bfloat16_and_keeps_hessians_and_activations_float32():
    from bpdq.engine.passes import calibration_autocast, collect_hessians
    from bpdq.solvers.hessian import HessianAccumulator

    torch.manual_seed(0)
    layer = tiny_model(layers=1).model.layers[0]
    hidden = torch.randn(2, 8, layer.mlp.gate_proj.in_features)
    pos = torch.arange(8).unsqueeze(0).expand(2, -1)
    pe = tiny_model(layers=1).model.rotary_emb(hidden, pos)
    batches = [Batch(hidden, (), {"position_embeddings": pe, "attention_mask": None})]
    seen: list[torch.dtype] = []
    hook = layer.self_attn.o_proj.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))
    try:
        plain = run_layer(layer, batches, torch.device("cpu"))
        with calibration_autocast(torch.bfloat16):
            cast = run_layer(layer, batches, torch.device("cpu"))
            H = collect_hessians(layer, ["mlp.down_proj"], batches, torch.device("cpu"))["mlp.down_proj"]
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.bfloat16, torch.bfloat16]
    assert cast[0].hidden.dtype == torch.float32 and not torch.equal(cast[0].hidden, plain[0].hidden)
    assert torch.allclose(cast[0].hidden, plain[0].hidden, atol=0.1, rtol=0.05)
    assert H.dtype == torch.float32
    # The accumulator's products are float32 inside an autocast: the same sums as outside one.
    x = torch.randn(64, 48)
    inside, outside = HessianAccumulator(48), HessianAccumulator(48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside.add(x)
    outside.add(x)
    assert torch.equal(inside.hessian, outside.hessian)


GPTQ_RECIPE = {**TINY_RECIPE, "solver": "gptq"}


@pytest.mark.parametrize(("flags", "value", "want"), [
    ({"avx2"}, "auto", "none"), ({"amx_bf16"}, "auto", "bfloat16"), ({"avx2"}, "bfloat16", "bfloat16"),
])
def test_calibration_autocast_comes_from_the_config_is_resolved_and_reported(monkeypatch, flags, value, want):
    import bpdq.devices

    monkeypatch.setattr(bpdq.devices, "_cpu_flags", lambda: frozenset(flags))
    report = bpdq.quantize_model(tiny_model(layers=1), tiny_tokenizer(), recipe=GPTQ_RECIPE, progress=False,
                                 device="cpu", calibration={**TINY_CALIBRATION, "autocast": value})
    assert report.calibration["autocast"] == want
    plain = bpdq.quantize_model(tiny_model(layers=1), tiny_tokenizer(), recipe=GPTQ_RECIPE, progress=False,
                                device="cpu", calibration=TINY_CALIBRATION)
    assert plain.calibration["autocast"] == "none"


def test_an_unknown_calibration_autocast_is_refused_before_any_work(monkeypatch):
    from pydantic import ValidationError

    monkeypatch.setattr("bpdq.engine.loop.capture_layer_inputs", lambda *a, **k: pytest.fail("no pass may run"))
    with pytest.raises(ValidationError, match="auto"):
        bpdq.quantize_model(tiny_model(layers=1), tiny_tokenizer(), recipe=GPTQ_RECIPE, progress=False,
                            calibration={**TINY_CALIBRATION, "autocast": "fp8"})
    with pytest.raises(ValueError, match=r"autocast must be one of \['none', 'bfloat16', 'float16', 'auto'\]"):
        bpdq.quantize_model(tiny_model(layers=1), tiny_tokenizer(), recipe=GPTQ_RECIPE, progress=False,
                            calibration=TINY_CALIBRATION, autocast="fp8")


def test_stores_made_from_one_another_share_one_budget_and_closing_gives_it_back(tmp_path):
    batch = lambda: Batch(torch.randn(2, 3, 4), (), {})  # noqa: E731 - 96 bytes
    inputs = ActivationStore(tmp_path, 200)  # room for two batches in all
    outputs, recordings = inputs.empty_like(), outputs_like(inputs)
    for store in (inputs, outputs, recordings):
        store.append(batch())
    assert [s.n_offloaded for s in (inputs, outputs, recordings)] == [0, 0, 1]
    inputs.close()  # its 96 bytes go back to the others
    recordings.append(batch())
    outputs.append(batch())
    assert (recordings.n_offloaded, outputs.n_offloaded) == (1, 1)
    assert sum(b.hidden.numel() for s in (outputs, recordings) for b in s._items if isinstance(b, Batch)) * 4 <= 200
