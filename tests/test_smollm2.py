"""The real SmolLM2-135M-Instruct (built-in, offline, loaded from GGUF): the first layer with BPDQ k=2,
the rest with 4-bit uniform RTN; perplexity stays finite and within a stated factor of full precision,
generation produces text, and the checkpoint (GGUF quantization_config replaced) reloads exactly."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

import bpdq
from bpdq.calibration import load_text
from bpdq.evaluate import perplexity
from bpdq.linear import QuantLinear
from bpdq.models import load_pretrained

pytestmark = pytest.mark.slow

# measured 1.58x (19.4 -> 30.8 on 2 x 256 held-out tokens); 3x bounds a regression, not the method's quality
# (a 3-plane RTN mix measured 6x: too lossy for a smoke test).
MAX_PPL_FACTOR = 3.0


@pytest.fixture(scope="module")
def quantized():
    model, tok = load_pretrained("smollm2-135m")
    assert model.config.quantization_config.quant_method == "gguf"
    text = load_text("builtin:python-docs-test")
    fp_ppl = perplexity(model, tok, text, seq_len=256, max_windows=2)
    rules = [{"match": r"model\.layers\.0\..*", "grid": {"type": "bitplane", "planes": 2}, "solver": {"type": "bpdq", "iters": 2}}]
    report = bpdq.quantize_model(
        model,
        tok,
        recipe={"group_size": 64, "grid": {"type": "uniform", "bits": 4}, "solver": "rtn"},
        calibration={"samples": 4, "seq_len": 128},
        rules=rules,
        device="cpu",
        progress=False,
    )
    q_ppl = perplexity(model, tok, text, seq_len=256, max_windows=2)
    logging.getLogger(__name__).info("SmolLM2 perplexity: full precision %.3f, quantized %.3f", fp_ppl, q_ppl)
    return model, tok, report, fp_ppl, q_ppl


def test_perplexity_within_factor(quantized):
    model, _, report, fp_ppl, q_ppl = quantized
    assert report.n_quantized == 30 * 7
    assert model.model.layers[0].self_attn.q_proj.k == 2 and model.model.layers[29].mlp.down_proj.k == 4
    assert math.isfinite(q_ppl) and fp_ppl < q_ppl < MAX_PPL_FACTOR * fp_ppl


def test_generation_produces_text(quantized):
    model, tok, *_ = quantized
    prompt = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    new = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out.shape[1] > prompt["input_ids"].shape[1] and any(c.isalpha() for c in new)


def test_checkpoint_replaces_gguf_config_and_reloads_exactly(quantized, tmp_path):
    model, tok, report, *_ = quantized
    bpdq.save(model, tok, tmp_path / "smol", report=report)
    config = json.loads((tmp_path / "smol" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bpdq"
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert report.checkpoint_bytes < (tmp_path / "smol" / "model.safetensors").stat().st_size + 1
    loaded, tok2 = bpdq.load(tmp_path / "smol")
    assert isinstance(loaded.model.layers[5].mlp.up_proj, QuantLinear)
    ids = tok("def main():\n    return 1", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
