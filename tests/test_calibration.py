"""Calibration text sources and deterministic token windows."""

from __future__ import annotations

import json

import pytest
import torch

from bpdq.calibration import calibration_windows, load_text
from bpdq.config import CalibrationConfig
from tests.tiny_models import tiny_tokenizer


def test_builtin_splits_are_prose_and_disjoint():
    cal, test = load_text("builtin:python-docs"), load_text("builtin:python-docs-test")
    assert len(cal) > 200_000 and len(test) > 50_000
    cal_paras = {p for p in cal.split("\n\n") if len(p) > 200}
    test_paras = {p for p in test.split("\n\n") if len(p) > 200}
    assert cal_paras and test_paras and not cal_paras & test_paras


def test_unknown_builtin_lists_known():
    with pytest.raises(ValueError, match="builtin:python-docs-test"):
        load_text("builtin:wikitext")


def test_txt_jsonl_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta"}) + "\n")
    (tmp_path / "ignored.csv").write_text("x,y")
    assert load_text(str(tmp_path / "a.txt")) == "alpha beta"
    assert load_text(str(tmp_path / "b.jsonl")) == "gamma\n\ndelta"
    assert load_text(str(tmp_path)) == "alpha beta\n\ngamma\n\ndelta"


def test_bad_sources_are_clear_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    (tmp_path / "data.csv").write_text("a,b")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_text(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match=r"broken.jsonl:1: not valid JSON"):
        load_text(str(tmp_path / "broken.jsonl"))
    with pytest.raises(ValueError, match=r"\.txt"):
        load_text(str(tmp_path / "data.csv"))
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        load_text(str(tmp_path / "sub"))
    with pytest.raises(ValueError, match="not an existing file"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(TypeError):
        load_text("")


def test_windows_are_deterministic_and_shaped():
    tok = tiny_tokenizer()
    cfg = CalibrationConfig(samples=5, seq_len=40, seed=3)
    a, b = calibration_windows(tok, cfg), calibration_windows(tok, cfg.model_dump())
    assert len(a) == 5 and all(w.shape == (40,) and w.dtype == torch.int64 for w in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = calibration_windows(tok, CalibrationConfig(samples=5, seq_len=40, seed=4))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # windows are real slices of the tokenized text
    text = load_text("builtin:python-docs")
    assert all(tok.decode(w) in text for w in a)


def test_text_too_short(tmp_path):
    (tmp_path / "short.txt").write_text("only a few words here")
    with pytest.raises(ValueError, match="fewer than seq_len=512"):
        calibration_windows(tiny_tokenizer(), {"text": str(tmp_path / "short.txt"), "seq_len": 512})
