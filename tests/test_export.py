"""Exporting a model as a safetensors directory (bpdq/export.py) and reading it back, lazily too."""

from __future__ import annotations

import pytest
import torch

from bpdq.export import export_model
from bpdq.engine.source import LazySource
from tests.tiny_models import tiny_model, tiny_model_dir

PROBE = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


def test_export_writes_an_ordinary_sharded_directory_with_the_same_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir(tmp_path / "src", "qwen2", layers=2)
    out = export_model(str(src), tmp_path / "out", max_shard_size="50KB")
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    again = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(again(PROBE).logits, tiny_model("qwen2", layers=2)(PROBE).logits)
    layer = LazySource(out).load("model.layers.1")
    assert torch.equal(layer.mlp.up_proj.weight, tiny_model("qwen2", layers=2).model.layers[1].mlp.up_proj.weight)
    with pytest.raises(FileExistsError, match="not empty"):
        export_model(str(src), out)
    before = sorted(p.name for p in src.iterdir())
    for target in (src, tmp_path):
        with pytest.raises(ValueError, match="the model '"):
            export_model(str(src), target, overwrite=True)
    assert sorted(p.name for p in src.iterdir()) == before


def test_export_refuses_a_quantized_checkpoint_and_leaves_nothing(tmp_path):
    import bpdq
    from tests.tiny_models import TINY_RECIPE, tiny_tokenizer

    model = tiny_model("llama", layers=1)
    bpdq.quantize_model(model, tiny_tokenizer(), recipe=TINY_RECIPE, progress=False, output=tmp_path / "q")
    with pytest.raises(ValueError, match="quantized checkpoint"):
        export_model(str(tmp_path / "q"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
