"""load_pretrained: built-in alias resolution, local transformers directories, bpdq checkpoints, errors."""

from __future__ import annotations

import pytest
import torch

import bpdq
from bpdq.linear import QuantLinear
from bpdq.models import BUILTIN_MODELS, load_pretrained
from bpdq.models import hub
from bpdq.models.hub import builtin_gguf
from tests.tiny_models import TINY_CALIBRATION, TINY_RECIPE, tiny_model, tiny_tokenizer


def test_builtin_alias_points_at_the_packaged_gguf():
    path = builtin_gguf("smollm2-135m")
    assert path.name == BUILTIN_MODELS["smollm2-135m"].gguf_file and path.stat().st_size > 50_000_000


def test_local_directory_and_bpdq_checkpoint(tmp_path):
    model, tok = tiny_model("qwen2", layers=1), tiny_tokenizer()
    model.save_pretrained(tmp_path / "fp")
    tok.save_pretrained(tmp_path / "fp")
    loaded, _ = load_pretrained(str(tmp_path / "fp"), dtype="float32")
    probe = torch.tensor([[3, 4, 5, 6]])
    assert torch.equal(loaded(probe).logits, model(probe).logits)
    bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, progress=False)
    bpdq.save(model, tok, tmp_path / "q")
    qmodel, _ = load_pretrained(str(tmp_path / "q"))
    assert isinstance(qmodel.model.layers[0].self_attn.q_proj, QuantLinear)
    assert torch.equal(qmodel(probe).logits, model(probe).logits)


def test_errors(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="neither a model directory nor a .gguf"):
        load_pretrained(str(tmp_path / "weights.bin"))
    with pytest.raises(TypeError):
        load_pretrained("")
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_pretrained(str(tmp_path), dtype="int3")


@pytest.mark.slow
def test_builtin_model_in_bfloat16_loads_without_transformers_gguf_warning(capfd):
    model, _ = load_pretrained("smollm2-135m", dtype="bfloat16")
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.config.dtype == torch.bfloat16
    assert "Loading a GGUF checkpoint" not in capfd.readouterr().err


@pytest.fixture
def fake_builtin(tmp_path, monkeypatch):
    """The built-in alias backed by a tiny Llama: ``builtin_gguf`` gives a placeholder file and the GGUF read
    returns the tiny model (counted in ``reads``); everything else is the real cache code."""
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF placeholder")
    reads = []
    real = hub._from_pretrained

    def from_pretrained(where, dtype, device, **kwargs):
        if "gguf_file" not in kwargs:
            return real(where, dtype, device, **kwargs)
        reads.append(where)
        model = tiny_model("llama", layers=1, tie_word_embeddings=True)
        return model.to(dtype or torch.float32), tiny_tokenizer()

    monkeypatch.setattr(hub, "builtin_gguf", lambda alias: gguf)
    monkeypatch.setattr(hub, "_from_pretrained", from_pretrained)
    monkeypatch.setenv("BPDQ_CACHE", str(tmp_path / "cache"))
    return gguf, reads


def test_builtin_model_is_converted_once_then_read_from_the_cache(fake_builtin):
    gguf, reads = fake_builtin
    first, tok = load_pretrained("smollm2-135m")
    cached = hub.builtin_cache_dir("smollm2-135m")
    assert len(reads) == 1 and (cached / "model.safetensors").is_file() and (cached / "bpdq-cache.json").is_file()
    again, tok2 = load_pretrained("smollm2-135m")
    assert len(reads) == 1  # not read from GGUF again
    a, b = first.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.lm_head.weight is again.model.embed_tokens.weight  # the tie survives the single stored copy
    assert again.config._name_or_path == str(gguf.parent)  # what checkpoints record, as from the GGUF file
    assert tok2("def f(x): return x")["input_ids"] == tok("def f(x): return x")["input_ids"]
    half, _ = load_pretrained("smollm2-135m", dtype="bfloat16")
    assert len(reads) == 1 and torch.equal(half.model.norm.weight, first.model.norm.weight.to(torch.bfloat16))
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_builtin_cache_off_damaged_unwritable_and_keyed_by_the_file(fake_builtin, tmp_path, monkeypatch, caplog):
    gguf, reads = fake_builtin
    monkeypatch.setenv("BPDQ_CACHE", "off")
    load_pretrained("smollm2-135m")
    load_pretrained("smollm2-135m")
    assert len(reads) == 2 and hub.builtin_cache_dir("smollm2-135m") is None and not (tmp_path / "cache").exists()

    monkeypatch.setenv("BPDQ_CACHE", str(tmp_path / "cache"))
    load_pretrained("smollm2-135m")
    cached = hub.builtin_cache_dir("smollm2-135m")
    (cached / "model.safetensors").write_bytes(b"not safetensors")
    model, _ = load_pretrained("smollm2-135m")  # damaged: read from GGUF again and rebuilt
    assert len(reads) == 4 and "does not load" in caplog.text
    load_pretrained("smollm2-135m")
    assert len(reads) == 4  # the rebuilt cache is used

    gguf.write_bytes(b"GGUF placeholder, another version")
    assert hub.builtin_cache_dir("smollm2-135m") != cached

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("BPDQ_CACHE", str(blocker))
    caplog.clear()
    model, _ = load_pretrained("smollm2-135m")  # the cache cannot be written: a warning, and the model still loads
    assert isinstance(model, torch.nn.Module) and "could not cache" in caplog.text

    monkeypatch.setenv("BPDQ_CACHE", str(tmp_path / "cache-2"))
    monkeypatch.setattr(hub, "_save_float_model", lambda model, directory: (_ for _ in ()).throw(ValueError("refused")))
    caplog.clear()
    model, _ = load_pretrained("smollm2-135m")  # a writer error that is not an OSError: the same
    assert isinstance(model, torch.nn.Module) and "ValueError: refused" in caplog.text
    assert not list((tmp_path / "cache-2" / "builtin").iterdir())  # its temporary directory removed


@pytest.mark.slow
def test_builtin_model_from_the_cache_equals_the_gguf_read(tmp_path, monkeypatch):
    from bpdq.calibration import load_text

    monkeypatch.setenv("BPDQ_CACHE", "off")
    direct, tok = load_pretrained("smollm2-135m")
    monkeypatch.setenv("BPDQ_CACHE", str(tmp_path / "cache"))
    load_pretrained("smollm2-135m")  # converts
    cached, tok2 = load_pretrained("smollm2-135m")
    a, b = direct.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    text = load_text("builtin:python-docs")[:50_000]
    assert tok(text)["input_ids"] == tok2(text)["input_ids"]
    assert tok.chat_template == tok2.chat_template and tok.special_tokens_map == tok2.special_tokens_map
    da, db = direct.config.to_dict(), cached.config.to_dict()
    da.pop("quantization_config", None)  # the GGUF reader's own marker
    assert da == db
