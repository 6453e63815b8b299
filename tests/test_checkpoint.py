"""Checkpoint save/load: layout, exact logits, atomic writes, strict loading with named errors."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import bpdq
from bpdq.checkpoint import replace_linears, unique_state_dict
from bpdq.linear import QuantLinear
from tests.tiny_models import TINY_CALIBRATION, TINY_RECIPE, tiny_model, tiny_tokenizer

PROBE = torch.tensor([[1, 2, 3, 50, 60, 70, 300]])


@pytest.fixture(scope="module")
def quantized():
    model, tok = tiny_model("llama", layers=1), tiny_tokenizer()
    report = bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, progress=False)
    return model, tok, report


@pytest.fixture
def ckpt(quantized, tmp_path):
    model, tok, report = quantized
    return bpdq.save(model, tok, tmp_path / "ckpt", report=report)


def test_layout(ckpt, quantized):
    files = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "bpdq_report.json", "tokenizer.json"} <= files
    config = json.loads((ckpt / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "bpdq" and qc["format_version"] == 1 and qc["bpdq_version"] == bpdq.__version__
    q = qc["modules"]["model.layers.0.self_attn.q_proj"]
    assert q["planes"] == 2 and q["group_size"] == 32 and q["grid"]["type"] == "bitplane" and q["solver"]["type"] == "rtn"
    assert len(qc["modules"]) == 7
    tensors = load_file(str(ckpt / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.planes"].dtype == torch.uint8
    assert tensors["model.layers.0.self_attn.q_proj.coeffs"].dtype == torch.float16
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors  # tied: stored once
    report = bpdq.RunReport.read(ckpt / "bpdq_report.json")
    assert report.checkpoint_bytes == (ckpt / "model.safetensors").stat().st_size
    assert report.n_quantized == quantized[2].n_quantized


def test_load_gives_equal_logits_and_no_dense_weights(ckpt, quantized):
    model, tok, _ = quantized
    loaded, tok2 = bpdq.load(ckpt)
    assert torch.equal(loaded(PROBE).logits, model(PROBE).logits)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    q = loaded.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantLinear) and not hasattr(q, "weight")
    assert tok2("some text")["input_ids"] == tok("some text")["input_ids"]
    # saving a loaded checkpoint again reproduces it
    again = bpdq.save(loaded, tok2, ckpt.parent / "again")
    assert (again / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    assert json.loads((again / "config.json").read_text())["quantization_config"] == json.loads((ckpt / "config.json").read_text())["quantization_config"]


def test_refuses_non_empty_directory_unless_overwrite(ckpt, quantized):
    model, tok, _ = quantized
    with pytest.raises(FileExistsError, match="overwrite"):
        bpdq.save(model, tok, ckpt)
    (ckpt / "stale.txt").write_text("old")
    bpdq.save(model, tok, ckpt, overwrite=True)
    assert not (ckpt / "stale.txt").exists() and (ckpt / "model.safetensors").exists()
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]


def test_interrupted_save_leaves_nothing(quantized, tmp_path, monkeypatch):
    model, tok, _ = quantized

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tok, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        bpdq.save(model, tok, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def _rewrite(ckpt, edit):
    tensors = load_file(str(ckpt / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(ckpt / "model.safetensors"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("model.layers.0.self_attn.o_proj.planes"), "missing.*o_proj.planes"),
        (lambda t: t.update(extra=torch.zeros(2)), "unexpected.*extra"),
        (lambda t: t.update({"model.norm.weight": torch.zeros(3)}), "model.norm.weight.*shape"),
        (lambda t: t.update({"model.layers.0.mlp.up_proj.coeffs": t["model.layers.0.mlp.up_proj.coeffs"].float()}), "up_proj.coeffs.*dtype"),
    ],
)
def test_damaged_tensors_are_named(ckpt, edit, message):
    _rewrite(ckpt, edit)
    with pytest.raises(ValueError, match=message):
        bpdq.load(ckpt)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda qc: qc.update(format_version=99), "format_version 99"),
        (lambda qc: qc.update(quant_method="gptq"), "quant_method is 'gptq'"),
        (lambda qc: qc["modules"]["model.layers.0.mlp.up_proj"].update(color="red"), r"up_proj.*unknown fields \['color'\]"),
        (lambda qc: qc["modules"]["model.layers.0.mlp.up_proj"].update(planes="two"), r"up_proj.*planes must be an integer"),
        (lambda qc: qc["modules"].update({"model.layers.0.nope": {"planes": 2, "group_size": 32}}), "model.layers.0.nope"),
        (lambda qc: qc["modules"].update({"model.layers.0.input_layernorm": {"planes": 2, "group_size": 32}}), "not an nn.Linear"),
    ],
)
def test_damaged_config_is_named(ckpt, edit, message):
    config = json.loads((ckpt / "config.json").read_text())
    edit(config["quantization_config"])
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        bpdq.load(ckpt)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="config.json is missing"):
        bpdq.load(tmp_path)


def test_replace_linears_builds_empty_quant_modules():
    model = tiny_model("qwen2", layers=1)
    replace_linears(model, {"model.layers.0.self_attn.k_proj": {"planes": 3, "group_size": 32}})
    k = model.model.layers[0].self_attn.k_proj
    assert isinstance(k, QuantLinear) and k.k == 3 and k.bias is not None and k.planes.shape == (3, 32, 8)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    with pytest.raises(ValueError, match="group_size"):
        replace_linears(model, {"model.layers.0.self_attn.q_proj": {"planes": 2, "group_size": 48}})


def test_modules_quantized_outside_the_pipeline_keep_their_recipe_and_relaid_planes_save_canonically(tmp_path):
    model, tok = tiny_model("llama", layers=1), tiny_tokenizer()
    for module in list(model.model.layers.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, QuantLinear.from_linear(child, grid={"type": "uniform", "bits": 2}, group_size=32))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        reference = model(ids).logits  # on CPU the cpu_lut kernel relays the planes out (strided) first
    bpdq.save(model, tok, tmp_path / "ck")
    entry = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]
    assert entry["grid"]["type"] == "uniform" and entry["solver"]["type"] == "rtn"  # from the module itself
    loaded, _ = bpdq.load(tmp_path / "ck")
    assert loaded.model.layers[0].mlp.up_proj.grid == entry["grid"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference)


def test_load_takes_the_dtype_of_the_saved_tensors_not_config_dtype(quantized, tmp_path):
    model, tok, _ = quantized
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert half.config.dtype != torch.bfloat16  # the config does not know about the cast
    loaded, _ = bpdq.load(bpdq.save(half, tok, tmp_path / "bf16"))
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.layers[0].self_attn.q_proj.coeffs.dtype == torch.float16
    expected, found = half.state_dict(), loaded.state_dict()
    assert sorted(expected) == sorted(found)
    assert all(torch.equal(found[k], v) for k, v in expected.items() if k in unique_state_dict(half))


def test_one_kernel_rule_for_both_loaders(quantized, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok, _ = quantized
    pinned = copy.deepcopy(model)
    pinned.model.layers[0].mlp.up_proj.set_kernel("torch")
    ckpt = bpdq.save(pinned, tok, tmp_path / "pinned")
    for loaded in (bpdq.load(ckpt)[0], AutoModelForCausalLM.from_pretrained(ckpt)):
        assert loaded.model.layers[0].mlp.up_proj.kernel == "torch"
        assert loaded.model.layers[0].mlp.down_proj.kernel == "auto"
    assert bpdq.load(ckpt, kernel="auto")[0].model.layers[0].mlp.up_proj.kernel == "auto"
    with pytest.raises(ValueError, match="unknown kernel 'fastest'"):
        bpdq.load(ckpt, kernel="fastest")


def test_device_is_checked_before_loading(ckpt, monkeypatch):
    import bpdq.safetensors_header as header

    def unreachable(*args, **kwargs):
        raise AssertionError("the weights were read before the device was checked")

    monkeypatch.setattr(header, "read_header", unreachable)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda' was requested but CUDA is not available"):
        bpdq.load(ckpt, device="cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        bpdq.load(ckpt, device="gpu")


def test_auto_device_loads_on_the_cpu_without_cuda(ckpt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bpdq.load(ckpt, device="auto")[0].model.norm.weight.device.type == "cpu"


DAMAGED_WEIGHTS = {
    "truncated": lambda data: data[: len(data) - 100],
    "absurd header size": lambda data: (2**62).to_bytes(8, "little") + data[8:],
    "header not JSON": lambda data: data[:8] + b"\xff" * (len(data) - 8),
    "pickle": lambda data: pickle.dumps({"model.norm.weight": [0.0] * 64}),
    "empty": lambda data: b"",
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_WEIGHTS))
def test_damaged_weights_file_is_named(ckpt, damage):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(DAMAGED_WEIGHTS[damage](weights.read_bytes()))
    with pytest.raises(ValueError, match=r"model\.safetensors is not a valid safetensors file"):
        bpdq.load(ckpt)


def test_a_checkpoint_without_a_tokenizer_loads_with_none(tmp_path):
    import bpdq
    from tests.tiny_models import TINY_RECIPE, tiny_model

    model = tiny_model("llama", layers=1)
    bpdq.quantize(model, {"quantize": TINY_RECIPE})
    bpdq.save(model, None, tmp_path / "ckpt")
    loaded, tokenizer = bpdq.load(tmp_path / "ckpt")
    assert tokenizer is None
    assert loaded.state_dict().keys() == model.state_dict().keys()


def test_a_checkpoint_config_that_disagrees_with_the_weights_is_refused(tmp_path):
    import json

    import bpdq
    from tests.tiny_models import TINY_RECIPE, tiny_model

    model = tiny_model("llama", layers=1)
    bpdq.quantize(model, {"quantize": TINY_RECIPE})
    path = bpdq.save(model, None, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1_000_000_000}))
    with pytest.raises(ValueError, match="config.json disagrees with the weights: it says num_hidden_layers 1000000000"):
        bpdq.load(path)
