"""``bpdq eval`` on the tiny model and its checkpoint: the CLI's perplexity is the library's
(bpdq/cli/cmd_eval.py)."""

from __future__ import annotations

import json
import re

import pytest

import bpdq
from bpdq.calibration import load_text
from bpdq.evaluate import perplexity
from bpdq.models import load_pretrained
from tests.cli.conftest import run_many

TEXT = "builtin:python-docs-test"
ARGS = ["--text", TEXT, "--seq-len", "32", "--max-windows", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_checkpoint):
    return run_many({
        "fp": ["eval", str(tiny_model_dir), *ARGS],
        "quantized": ["eval", str(tiny_checkpoint[1]), *ARGS, "--json"],
    })


def _library_ppl(model_tok):
    model, tok = model_tok
    return perplexity(model, tok, load_text(TEXT), seq_len=32, max_windows=3)


def test_full_precision_perplexity_is_printed(runs, tiny_model_dir):
    proc = runs["fp"]
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"perplexity ([0-9.]+)  \(.* on builtin:python-docs-test: 3 windows of 32 tokens\)", proc.stdout)
    assert match, proc.stdout
    assert float(match.group(1)) == pytest.approx(_library_ppl(load_pretrained(str(tiny_model_dir))), abs=1e-3)


def test_checkpoint_perplexity_as_json(runs, tiny_checkpoint):
    proc = runs["quantized"]
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["quantized"] is True and result["windows"] == 3 and result["tokens"] == 96
    assert result["perplexity"] == pytest.approx(_library_ppl(bpdq.load(tiny_checkpoint[1])), rel=1e-5)
    fp = float(re.search(r"perplexity ([0-9.]+)", runs["fp"].stdout).group(1))
    assert result["perplexity"] != pytest.approx(fp, rel=1e-6)  # the quantized model is a different model


@pytest.mark.parametrize(
    "content, expected", [("", "--text: calibration file"), ("just a few words", "--text: the text has")]
)
def test_empty_or_too_short_text_is_a_usage_error(in_process, capsys, tmp_path, tiny_model_dir, content, expected):
    path = tmp_path / "t.txt"
    path.write_text(content)
    assert in_process(["eval", str(tiny_model_dir), "--text", str(path), "--seq-len", "64"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_truncated_weights_are_a_usage_error_naming_the_file(in_process, capsys, truncated_checkpoint):
    assert in_process(["eval", str(truncated_checkpoint), "--text", TEXT, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{truncated_checkpoint / 'model.safetensors'} is not a valid safetensors file (truncated" in err
    assert "Traceback" not in err


def test_seq_len_beyond_the_model_positions_is_a_usage_error(in_process, capsys, tiny_model_dir):
    assert in_process(["eval", str(tiny_model_dir), "--text", TEXT, "--seq-len", "257", "--device", "cpu"]) == 2
    assert "--seq-len: --seq-len is 257 tokens, beyond the model's maximum of 256 positions" in capsys.readouterr().err


def test_a_truncated_config_is_a_usage_error_naming_the_file(in_process, capsys, truncated_config_checkpoint):
    args = ["eval", str(truncated_config_checkpoint), "--text", "builtin:python-docs-test", "--device", "cpu"]
    assert in_process(args) == 2
    err = capsys.readouterr().err
    assert str(truncated_config_checkpoint / "config.json") in err and "Traceback" not in err


def test_a_checkpoint_without_a_tokenizer_needs_the_tokenizer_flag(in_process, capsys, tokenizerless_checkpoint,
                                                                     tiny_model_dir):
    args = ["eval", str(tokenizerless_checkpoint), "--text", "builtin:python-docs-test", "--seq-len", "32",
            "--max-windows", "2", "--device", "cpu", "--json"]
    assert in_process(args) == 2
    err = capsys.readouterr().err
    assert f"{tokenizerless_checkpoint} has no tokenizer" in err and "--tokenizer" in err and "Traceback" not in err
    assert in_process([*args, "--tokenizer", str(tiny_model_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["windows"] == 2
