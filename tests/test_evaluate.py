"""Perplexity over non-overlapping windows."""

from __future__ import annotations

import math

import pytest
import torch

from bpdq.calibration import load_text
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
