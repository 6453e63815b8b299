"""bpdq/pipeline/hostmem.py: freed host memory goes back to the OS after each group and each layer."""

from __future__ import annotations

import torch

import bpdq
import bpdq.pipeline.hostmem as hostmem
import bpdq.pipeline.run
from bpdq.models.base import get_adapter
from tests.tiny_models import TINY_CALIBRATION, TINY_RECIPE, tiny_model, tiny_tokenizer


def test_trim_runs_on_this_platform():
    hostmem.trim_host_memory()  # glibc here: malloc_trim exists and is called without error
    assert hostmem._malloc_trim() is not None


def test_a_run_trims_after_every_group_and_every_layer(monkeypatch):
    calls = []
    monkeypatch.setattr(bpdq.pipeline.run, "trim_host_memory", lambda: calls.append(1))
    model = tiny_model("llama", seed=0)
    groups = len(get_adapter(model).linear_groups(model.model.layers[0]))
    layers = len(model.model.layers)
    bpdq.quantize_model(model, tokenizer=tiny_tokenizer(), recipe=TINY_RECIPE, calibration=TINY_CALIBRATION,
                        progress=False)
    assert len(calls) == layers * groups + layers
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
