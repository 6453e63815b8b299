"""Sources (bpdq/engine/source.py): the lazy directory source checks shard headers before reading any
tensor, materialises one module with the stored values and releases it back to the meta device."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bpdq.engine.source import InMemorySource, LazySource, is_model_directory
from bpdq.shards import INDEX_FILE
from tests.tiny_models import tiny_model, tiny_model_dir


@pytest.fixture
def model_dir(tmp_path):
    return tiny_model_dir(tmp_path / "src", "qwen3", layers=3, max_shard_size="100KB")


def test_lazy_modules_hold_the_stored_tensors_and_are_released(model_dir):
    reference = tiny_model("qwen3", layers=3)
    source = LazySource(model_dir)
    layers = source.model.model.layers
    assert all(p.is_meta for p in source.model.parameters()), "nothing is read before it is asked for"
    layer = source.load("model.layers.1")
    assert layer is layers[1] and not any(p.is_meta for p in layer.parameters())
    assert all(p.is_meta for p in layers[0].parameters()) and all(p.is_meta for p in layers[2].parameters())
    for (name, p), (_, ref) in zip(layer.named_parameters(), reference.model.layers[1].named_parameters()):
        assert torch.equal(p, ref), name
    assert str(model_dir) not in open("/proc/self/maps").read(), "shards are closed after reading"
    source.release("model.layers.1")
    assert all(p.is_meta for p in layers[1].parameters())
    source.load_outside("model.layers")
    assert torch.equal(source.model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    assert source.model.lm_head.weight is source.model.model.embed_tokens.weight, "tied weights stay tied"
    assert all(p.is_meta for p in layers.parameters())


def test_dtype_is_applied_to_floating_tensors(model_dir):
    source = LazySource(model_dir, "bfloat16")
    layer = source.load("model.layers.0")
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    ref = tiny_model("qwen3", layers=3).model.layers[0].self_attn.q_proj.weight
    assert torch.equal(layer.self_attn.q_proj.weight, ref.to(torch.bfloat16))


def test_a_tensor_of_the_wrong_shape_is_named(model_dir):
    index = json.loads((model_dir / INDEX_FILE).read_text())
    name = "model.layers.2.mlp.up_proj.weight"
    shard = model_dir / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"tensor '{name}' in {shard.name} has shape \\(3, 3\\), the model .* expects \\(128, 64\\)"):
        LazySource(model_dir)


def test_a_missing_tensor_is_named(model_dir):
    index = json.loads((model_dir / INDEX_FILE).read_text())
    name = "model.layers.0.input_layernorm.weight"
    shard = model_dir / index["weight_map"][name]
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"tensor '{name}' of the model is in none of its safetensors files"):
        LazySource(model_dir)


def test_model_directories_and_the_in_memory_source(model_dir, tmp_path):
    assert is_model_directory(model_dir) and not is_model_directory(tmp_path / "nowhere")
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bpdq"}
    (model_dir / "config.json").write_text(json.dumps(config))
    assert not is_model_directory(model_dir), "a bpdq checkpoint is not a model to quantize"
    model = tiny_model("llama", layers=1)
    source = InMemorySource(model)
    assert source.load("model.layers.0") is model.model.layers[0]
    source.release("model.layers.0")
    assert not any(p.is_meta for p in model.parameters())


def test_a_lazy_source_leaves_the_allocator_alone_unless_asked(model_dir, monkeypatch):
    import bpdq.engine.source as source

    calls = []
    monkeypatch.setattr(source, "cap_mmap_threshold", lambda threshold=None: calls.append(threshold) or True)
    LazySource(model_dir)  # a library call must not change a process-wide setting
    assert calls == []
    LazySource(model_dir, tune_allocator=True)
    assert calls == [source.SKELETON_MMAP_THRESHOLD, None]


def test_a_lazy_source_pins_the_mmap_threshold_before_building_the_skeleton(model_dir, monkeypatch):
    import transformers

    import bpdq.engine.source as source

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert source.cap_mmap_threshold() is True  # glibc here: mallopt accepts it
    calls = []
    monkeypatch.setattr(source, "cap_mmap_threshold", lambda threshold=None: calls.append(threshold) or True)
    from_config = transformers.AutoModelForCausalLM.from_config
    def skeleton(config, **kwargs):  # the whole model's (a one-layer meta probe checks the config first)
        if config.num_hidden_layers == 3:
            calls.append("skeleton")
        return from_config(config, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", skeleton)
    LazySource(model_dir, tune_allocator=True)
    # the skeleton's weights are allocated before they move to meta: above the threshold they would leave
    # a heap of their size that later layers re-dirty piecemeal; the run goes on at MMAP_THRESHOLD
    assert calls == [source.SKELETON_MMAP_THRESHOLD, "skeleton", None]
    calls.clear()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config",
                        lambda c, **k: 1 / 0 if c.num_hidden_layers == 3 else from_config(c, **k))
    with pytest.raises(ZeroDivisionError):
        LazySource(model_dir, tune_allocator=True)
    assert calls == [source.SKELETON_MMAP_THRESHOLD, None]  # restored on an error too


def test_the_environment_s_mmap_threshold_is_left_alone(monkeypatch):
    import bpdq.engine.source as source

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    assert source.cap_mmap_threshold() is False


def _edit_config(model_dir, **changes):
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, what", [
    ({"num_hidden_layers": 1_000_000_000}, "num_hidden_layers 1000000000, .* 3 decoder layers"),
    ({"num_hidden_layers": 4}, "num_hidden_layers 4, .* 3 decoder layers"),
    ({"num_hidden_layers": "many"}, "num_hidden_layers"),
    ({"hidden_size": 1e7}, "hidden_size"),
    ({"hidden_size": 10**7}, r"model\.embed_tokens\.weight"),
    ({"intermediate_size": 10**9}, r"model\.layers\.0\.mlp\.\w+_proj\.weight"),
    ({"vocab_size": 10**9}, r"model\.embed_tokens\.weight"),
])
def test_a_config_that_disagrees_with_the_weights_is_refused_before_the_skeleton(tmp_path, monkeypatch, changes, what):
    import transformers

    model_dir = tiny_model_dir(tmp_path / "llama", "llama", layers=3)

    build = transformers.AutoModelForCausalLM.from_config

    def no_skeleton(config, *args, **kwargs):
        assert config.num_hidden_layers <= 1, "the model skeleton was built from the config"
        return build(config, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", no_skeleton)
    _edit_config(model_dir, **changes)
    with pytest.raises(ValueError, match=f"config.json.*{what}") as info:
        LazySource(model_dir)
    assert str(model_dir / "config.json") in str(info.value)


def test_an_invalid_config_is_named(model_dir):
    _edit_config(model_dir, num_hidden_layers=7)  # Qwen3's layer_types lists 3 layers
    with pytest.raises(ValueError, match="(?s)cannot read .*config.json.*num_hidden_layers"):
        LazySource(model_dir)


def test_a_config_with_fewer_layers_than_the_weights_reads_only_those(tmp_path, caplog):
    model_dir = tiny_model_dir(tmp_path / "llama", "llama", layers=3)
    _edit_config(model_dir, num_hidden_layers=2)
    source = LazySource(model_dir)
    assert len(source.model.model.layers) == 2
    assert "ignoring 9 tensors the model does not use" in caplog.text  # layer 2's
