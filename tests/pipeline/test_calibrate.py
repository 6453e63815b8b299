"""Layer-by-layer calibration helpers (bpdq/pipeline/calibrate.py): replaying finished sub-blocks."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import bpdq
from bpdq.pipeline.calibrate import ActivationStore, Batch, Replay, outputs_like, run_layer
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
    register(bpdq.ADAPTERS, "NoReplayLlama", dataclasses.replace(LLAMA, architecture="NoReplayLlama", replay=()))
    attention = type(tiny_model("llama", layers=1).model.layers[0].self_attn)
    real_forward, runs = attention.forward, []

    def counting_forward(self, *args, **kwargs):
        runs[-1] += 1
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(attention, "forward", counting_forward)
    states = []
    for arch in ("LlamaForCausalLM", "NoReplayLlama"):
        model = tiny_model("llama", layers=2)
        model.config.architectures = [arch]
        recipe = {**TINY_RECIPE, "solver": {"type": "bpdq", "iters": 2}}
        runs.append(0)
        bpdq.quantize_model(model, tok, recipe=recipe, calibration=TINY_CALIBRATION, progress=False)
        states.append(model.state_dict())
    assert runs[0] < runs[1]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_pass_over_a_store_writes_to_a_store_with_its_budget(tmp_path):
    layer = Layer()
    batches = [Batch(torch.randn(2, 3, 4), (), {}) for _ in range(3)]
    store = ActivationStore(tmp_path, 2 * 3 * 4 * 4)  # room for one batch: the others go to disk
    for b in batches:
        store.append(b)
    out = run_layer(layer, store, torch.device("cpu"))
    assert isinstance(out, ActivationStore) and out.budget == store.budget and out.n_offloaded == 2
    expected = run_layer(layer, batches, torch.device("cpu"))
    assert isinstance(expected, list) and isinstance(outputs_like(batches), list)
    for a, b in zip(out, expected):  # a tensor read back from disk may sit at another alignment: last-bit differences
        torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-6, atol=1e-6)
    out.close()
    store.close()
