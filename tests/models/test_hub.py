"""load_pretrained: built-in alias resolution, local transformers directories, bpdq checkpoints, errors."""

from __future__ import annotations

import pytest
import torch

import bpdq
from bpdq.linear import QuantLinear
from bpdq.models import BUILTIN_MODELS, load_pretrained
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
