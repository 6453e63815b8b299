"""Loading bpdq checkpoints through transformers' ``from_pretrained`` (bpdq/hf.py)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.quantizers import auto as hf_auto
from transformers.quantizers.quantizer_eetq import EetqHfQuantizer
from transformers.utils.quantization_config import EetqConfig, QuantizationConfigMixin

import bpdq
from bpdq import hf
from bpdq.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from tests.tiny_models import TINY_CALIBRATION, TINY_RECIPE, tiny_model, tiny_tokenizer

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``checkpoints(arch)``: a bpdq checkpoint of a tiny random model (RTN, 2 planes), made once per arch."""
    made: dict[str, Path] = {}

    def _make(arch: str = "llama") -> Path:
        if arch not in made:
            model, tokenizer = tiny_model(arch), tiny_tokenizer()
            report = bpdq.quantize_model(model, tokenizer, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, progress=False)
            made[arch] = bpdq.save(model, tokenizer, tmp_path_factory.mktemp(arch) / "ckpt", report=report)
        return made[arch]

    return _make


@pytest.fixture
def scratch(checkpoints, tmp_path):
    """A private copy of the llama checkpoint that a test may corrupt."""
    return Path(shutil.copytree(checkpoints("llama"), tmp_path / "ckpt"))


def _input_ids(directory: Path) -> torch.Tensor:
    return bpdq.load(directory)[1](PROMPT, return_tensors="pt").input_ids


def _quantized_names(directory: Path) -> set[str]:
    return set(json.loads((directory / CONFIG_FILE).read_text())["quantization_config"]["modules"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_from_pretrained_gives_quantlinear_and_the_logits_of_bpdq_load(checkpoints, arch):
    directory = checkpoints(arch)
    model = AutoModelForCausalLM.from_pretrained(directory)
    reference, _ = bpdq.load(directory)
    quantized = {name for name, m in model.named_modules() if isinstance(m, bpdq.QuantLinear)}
    assert quantized == _quantized_names(directory) and len(quantized) == 14
    assert isinstance(model.config.quantization_config, hf.BpdqConfig)
    ids = _input_ids(directory)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_no_dense_weight_of_a_quantized_linear_is_materialised(checkpoints):
    directory = checkpoints("llama")
    model = AutoModelForCausalLM.from_pretrained(directory)
    for name in _quantized_names(directory):
        layer = model.get_submodule(name)
        assert not hasattr(layer, "weight")
        assert {n for n, _ in layer.named_parameters()} | {n for n, _ in layer.named_buffers()} <= {"planes", "coeffs", "bias"}
        assert layer.planes.dtype == torch.uint8 and layer.coeffs.dtype == torch.float16
    # Every tensor the model holds came from the file, at the file's size.
    stored = load_file(str(directory / WEIGHTS_FILE))
    held = {id(t): t for t in list(model.parameters()) + [b for n, b in model.named_buffers() if n in model.state_dict()]}
    assert sum(t.nbytes for t in held.values()) == sum(t.nbytes for t in stored.values())
    assert all(t.device.type == "cpu" for t in held.values())


def test_generate_matches_bpdq_load(checkpoints):
    directory = checkpoints("llama")
    model = AutoModelForCausalLM.from_pretrained(directory)
    reference, tokenizer = bpdq.load(directory)
    ids = _input_ids(directory)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    out = model.generate(ids, **kwargs)
    assert out.shape == (1, ids.shape[1] + 6)
    assert torch.equal(out, reference.generate(ids, **kwargs))


def test_save_pretrained_writes_a_checkpoint_both_loaders_read(checkpoints, tmp_path):
    directory = checkpoints("llama")
    model = AutoModelForCausalLM.from_pretrained(directory)
    model.save_pretrained(tmp_path / "again")
    bpdq.load(directory)[1].save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / CONFIG_FILE).read_text())["quantization_config"]
    assert saved == json.loads((directory / CONFIG_FILE).read_text())["quantization_config"]
    ids = _input_ids(directory)
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(bpdq.load(tmp_path / "again")[0](ids).logits, expected)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "again")(ids).logits, expected)


def test_bpdq_save_of_a_from_pretrained_model_keeps_the_recipes(checkpoints, tmp_path):
    directory = checkpoints("llama")
    model = AutoModelForCausalLM.from_pretrained(directory)
    bpdq.save(model, bpdq.load(directory)[1], tmp_path / "resaved")
    modules = json.loads((tmp_path / "resaved" / CONFIG_FILE).read_text())["quantization_config"]["modules"]
    assert modules == json.loads((directory / CONFIG_FILE).read_text())["quantization_config"]["modules"]
    assert modules[Q]["solver"]["type"] == "rtn" and modules[Q]["grid"]["type"] == "bitplane"


def test_sharded_save_pretrained_loads(checkpoints, tmp_path):
    directory = checkpoints("llama")
    model = AutoModelForCausalLM.from_pretrained(directory)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    ids = _input_ids(directory)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")(ids).logits, model(ids).logits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_requested_dtype_casts_float_tensors_but_not_packed_buffers(checkpoints, dtype):
    directory = checkpoints("qwen2")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    layer = model.get_submodule(Q)
    assert (layer.planes.dtype, layer.coeffs.dtype, layer.bias.dtype) == (torch.uint8, torch.float16, dtype)
    assert model.get_input_embeddings().weight.dtype == dtype
    ids = _input_ids(directory)
    with torch.no_grad():
        logits, reference = model(ids).logits.float(), bpdq.load(directory)[0](ids).logits
    assert torch.allclose(logits, reference, atol=0.02 * reference.abs().max().item())


def test_docs_example_runs(checkpoints):
    text = (Path(__file__).parents[1] / "docs" / "transformers.md").read_text()
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"runs/smollm2-bpdq-2bit"' in example
    exec(example.replace('"runs/smollm2-bpdq-2bit"', repr(str(checkpoints("llama")))), {})


def test_checkpoint_config_says_how_to_load_it(checkpoints):
    qc = json.loads((checkpoints("llama") / CONFIG_FILE).read_text())["quantization_config"]
    assert "pip install bpdq" in qc["loading"] and "import bpdq" in qc["loading"] and "bpdq.load" in qc["loading"]


def _edit_tensors(directory: Path, edit) -> None:
    tensors = load_file(str(directory / WEIGHTS_FILE))
    edit(tensors)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


Q = "model.layers.0.self_attn.q_proj"
TENSOR_DAMAGE = {
    "missing": (lambda t: t.pop(f"{Q}.coeffs"), rf"missing \['{Q}.coeffs'\]"),
    "extra": (lambda t: t.update({f"{Q}.scales": torch.ones(4)}), rf"unexpected \['{Q}.scales'\]"),
    "shape": (lambda t: t.update({f"{Q}.planes": t[f"{Q}.planes"][:1].clone()}), rf"'{Q}.planes' has shape \(1, 64, 8\)"),
    "dtype": (lambda t: t.update({f"{Q}.coeffs": t[f"{Q}.coeffs"].float()}), rf"'{Q}.coeffs' has dtype torch.float32"),
    "float8": (lambda t: t.update({f"{Q}.coeffs": t[f"{Q}.coeffs"].to(torch.float8_e4m3fn)}), rf"'{Q}.coeffs' has dtype torch.float8_e4m3fn"),
    "signed": (lambda t: t.update({f"{Q}.planes": t[f"{Q}.planes"].to(torch.int8)}), rf"'{Q}.planes' has dtype torch.int8"),
    "dense": (lambda t: t.update({f"{Q}.weight": torch.zeros(64, 64)}), rf"unexpected \['{Q}.weight'\]"),
}
LOADERS = {"from_pretrained": AutoModelForCausalLM.from_pretrained, "bpdq.load": bpdq.load}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("damage", TENSOR_DAMAGE)
def test_damaged_tensors_fail_naming_the_tensor(scratch, damage, loader):
    edit, message = TENSOR_DAMAGE[damage]
    _edit_tensors(scratch, edit)
    with pytest.raises(ValueError, match=message):
        LOADERS[loader](scratch)


CONFIG_DAMAGE = {
    "format_version": (lambda qc: qc.update(format_version=999), r"format_version 999; this bpdq reads 1"),
    "planes": (lambda qc: qc["modules"][Q].update(planes="two"), rf"modules\['{Q}'\]\.planes must be an integer"),
    "module": (lambda qc: qc["modules"].update({"model.nowhere": qc["modules"][Q]}), r"'model.nowhere', which the model does not have"),
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("damage", CONFIG_DAMAGE)
def test_damaged_quantization_config_fails_naming_the_field(scratch, damage, loader):
    edit, message = CONFIG_DAMAGE[damage]
    config = json.loads((scratch / CONFIG_FILE).read_text())
    edit(config["quantization_config"])
    (scratch / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        LOADERS[loader](scratch)


def test_only_safetensors_files_are_read(scratch):
    torch.save(load_file(str(scratch / WEIGHTS_FILE)), scratch / "pytorch_model.bin")
    (scratch / WEIGHTS_FILE).unlink()
    with pytest.raises(ValueError, match="safetensors files only, got 'pytorch_model.bin'"):
        AutoModelForCausalLM.from_pretrained(scratch)
    with pytest.raises(ValueError, match="bpdq reads safetensors only"):
        bpdq.load(scratch)


def test_weights_only_false_is_refused(checkpoints):
    with pytest.raises(ValueError, match="weights_only=True"):
        AutoModelForCausalLM.from_pretrained(checkpoints("llama"), weights_only=False)


def test_from_pretrained_does_not_quantize_a_dense_model(checkpoints, tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    qc = json.loads((checkpoints("llama") / CONFIG_FILE).read_text())["quantization_config"]
    with pytest.raises(ValueError, match=r"quantize a dense model with bpdq\.quantize "):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=hf.BpdqConfig(**qc))


def test_config_validates_on_construction():
    with pytest.raises(ValueError, match="format_version"):
        hf.BpdqConfig(format_version=2, modules={})
    with pytest.raises(ValueError, match="quant_method is 'gptq'"):
        hf.BpdqConfig(quant_method="gptq", format_version=1, modules={})
    fields = {"format_version": 1, "bpdq_version": "x", "loading": "note", "modules": {}}
    assert hf.BpdqConfig.from_dict({"quant_method": "bpdq", **fields}).to_dict() == {"quant_method": "bpdq", **fields}


def test_registration_is_idempotent(monkeypatch):
    monkeypatch.setitem(hf_auto.AUTO_QUANTIZER_MAPPING, "bpdq", hf.BpdqHfQuantizer)
    monkeypatch.setitem(hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "bpdq", hf.BpdqConfig)
    hf.register()
    importlib.reload(bpdq)
    assert hf_auto.AUTO_QUANTIZER_MAPPING["bpdq"] is hf.BpdqHfQuantizer
    assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["bpdq"] is hf.BpdqConfig
    # A stale copy of bpdq's own class (what importlib.reload(bpdq.hf) leaves behind) is replaced.
    stale = type("BpdqConfig", (QuantizationConfigMixin,), {"__module__": "bpdq.hf", "__qualname__": "BpdqConfig"})
    monkeypatch.setitem(hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "bpdq", stale)
    hf.register()
    assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["bpdq"] is hf.BpdqConfig


def test_a_name_owned_by_another_package_is_an_error(monkeypatch):
    monkeypatch.setitem(hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "bpdq", hf.BpdqConfig)
    monkeypatch.setitem(hf_auto.AUTO_QUANTIZER_MAPPING, "bpdq", EetqHfQuantizer)
    with pytest.raises(ValueError, match=r"quantizer registered for quant_method 'bpdq': .*EetqHfQuantizer"):
        hf.register()
    assert hf_auto.AUTO_QUANTIZER_MAPPING["bpdq"] is EetqHfQuantizer


def test_a_conflict_changes_nothing(monkeypatch):
    monkeypatch.setitem(hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "bpdq", EetqConfig)
    monkeypatch.delitem(hf_auto.AUTO_QUANTIZER_MAPPING, "bpdq")
    with pytest.raises(ValueError, match=r"quantization config registered for quant_method 'bpdq': .*EetqConfig"):
        hf.register()
    assert "bpdq" not in hf_auto.AUTO_QUANTIZER_MAPPING
    assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["bpdq"] is EetqConfig


def test_without_bpdq_transformers_warns_and_builds_a_dense_model(checkpoints):
    """What docs/transformers.md describes: no crash, a warning and a load report, nn.Linear layers whose
    weights are missing from the checkpoint (randomly initialised), and the config's loading note. Then, in
    the same process, importing bpdq late and reloading it makes the same call load QuantLinear modules."""
    script = (
        "import importlib, json, sys\n"
        "from transformers import AutoModelForCausalLM\n"
        f"path, name = {str(checkpoints('llama'))!r}, {Q!r}\n"
        "model = AutoModelForCausalLM.from_pretrained(path)\n"
        "seen = [type(model.get_submodule(name)).__name__, 'bpdq' in sys.modules, model.config.quantization_config['loading']]\n"
        "import bpdq, bpdq.hf\n"
        "importlib.reload(bpdq.hf); importlib.reload(bpdq)\n"
        "seen.append(type(AutoModelForCausalLM.from_pretrained(path).get_submodule(name)).__name__)\n"
        "print(json.dumps(seen))\n"
    )
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "warning"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180, check=True)
    layer, imported, note, after_import = json.loads(done.stdout.strip().splitlines()[-1])
    assert (layer, imported, after_import) == ("Linear", False, "QuantLinear")
    assert "import bpdq" in note
    assert done.stderr.count("Unknown quantization type, got bpdq") == 1
    assert "MISSING" in done.stderr and "UNEXPECTED" in done.stderr


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sharded_checkpoints_load_with_equal_logits(arch, tmp_path):
    model, tokenizer = tiny_model(arch, layers=3), tiny_tokenizer()
    rules = [{"match": "lm_head", "grid": {"type": "bitplane", "planes": 4}}]
    bpdq.quantize_model(model, tokenizer, recipe={**TINY_RECIPE, "solver": "gptq"}, calibration=TINY_CALIBRATION,
                        rules=rules, progress=False)
    directory = bpdq.save(model, tokenizer, tmp_path / "ckpt", max_shard_size="20KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4 and not (directory / WEIGHTS_FILE).exists()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = model(ids).logits
    loaded, _ = bpdq.load(directory)
    assert torch.equal(loaded(ids).logits, expected)
    hf = AutoModelForCausalLM.from_pretrained(directory)
    assert isinstance(hf.lm_head, bpdq.QuantLinear) and torch.equal(hf(ids).logits, expected)
