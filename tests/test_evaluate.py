"""Perplexity over non-overlapping windows."""

from __future__ import annotations

import math

import pytest
import torch

from bpdq.calibration import load_text
import bpdq.evaluate
from bpdq.evaluate import eval_windows, perplexity
from tests.tiny_models import tiny_model, tiny_tokenizer

TEXT = load_text("builtin:python-docs-test")[:20_000]


def test_matches_transformers_loss_per_window():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    windows = eval_windows(tok, TEXT, 32, max_windows=3)
    assert windows.shape == (3, 32)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss for w in windows]
    expected = math.exp(float(torch.stack(losses).mean()))  # equal token counts per window
    assert perplexity(model, tok, TEXT, seq_len=32, max_windows=3, batch_size=2) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, tok, TEXT, seq_len=32, max_windows=3, batch_size=1) == pytest.approx(expected, rel=1e-5)


def test_logits_are_computed_a_chunk_at_a_time(monkeypatch):
    """The head never sees more than LOSS_CHUNK tokens, and chunking changes nothing but summation order."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    expected = perplexity(model, tok, TEXT, seq_len=32, max_windows=3, batch_size=3)
    monkeypatch.setattr(bpdq.evaluate, "LOSS_CHUNK", 7)  # not a divisor of 3 * 31 predicted tokens
    rows = []
    model.lm_head.register_forward_pre_hook(lambda _m, args: rows.append(args[0].reshape(-1, 64).shape[0]))
    assert perplexity(model, tok, TEXT, seq_len=32, max_windows=3, batch_size=3) == pytest.approx(expected, rel=1e-6)
    assert max(rows) == 7 and sum(rows) == 3 * 31


def test_logit_soft_capping_and_scale_follow_the_model():
    model, tok = tiny_model("llama", layers=1), tiny_tokenizer()
    windows = eval_windows(tok, TEXT, 16, max_windows=2)
    with torch.no_grad():
        hidden = model.model(input_ids=windows).last_hidden_state[:, :-1].reshape(-1, 64)
        logits = model.lm_head(hidden)
    targets = windows[:, 1:].reshape(-1)
    model.config.final_logit_softcapping, model.config.logit_scale = 0.5, 3.0
    expected = torch.nn.functional.cross_entropy(torch.tanh(logits * 3.0 / 0.5) * 0.5, targets, reduction="sum")
    with torch.no_grad():
        assert bpdq.evaluate.chunked_nll(model, hidden, targets, chunk=5) == pytest.approx(float(expected), rel=1e-5)


def test_seq_len_beyond_the_model_positions_is_refused():
    model, tok = tiny_model("llama", layers=1), tiny_tokenizer()
    with pytest.raises(ValueError, match="seq_len is 512 tokens, beyond the model's maximum of 256 positions"):
        perplexity(model, tok, TEXT, seq_len=512)


def test_uniform_prediction_gives_vocabulary_size():
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: the embeddings are zero too, every logit is 0
    assert perplexity(model, tok, TEXT, seq_len=16, max_windows=2) == pytest.approx(len(tok), rel=1e-5)


def test_windows_are_consecutive_and_non_overlapping():
    tok = tiny_tokenizer()
    ids = tok(TEXT, add_special_tokens=False, verbose=False)["input_ids"]
    w = eval_windows(tok, TEXT, 50)
    assert w.shape[0] == len(ids) // 50 and w.flatten().tolist() == ids[: w.numel()]


def test_errors():
    model, tok = tiny_model("llama", layers=1), tiny_tokenizer()
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tok, "too short", seq_len=64)
    with pytest.raises(ValueError, match="non-empty"):
        perplexity(model, tok, "  ")
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(model, tok, TEXT, seq_len=1)
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(model, tok, TEXT, max_windows=0)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, tok, TEXT, batch_size=0)
