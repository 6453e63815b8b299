"""``bpdq generate`` on the tiny checkpoint: the CLI's greedy completion is the library's
(bpdq/cli/cmd_generate.py)."""

from __future__ import annotations

import json

import torch

import bpdq
from tests.cli.conftest import run_cli

PROMPT = "The function returns"


def test_greedy_completion_matches_the_library(tiny_checkpoint):
    proc = run_cli("generate", str(tiny_checkpoint[1]), "--prompt", PROMPT, "--max-new-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    model, tok = bpdq.load(tiny_checkpoint[1])
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    expected = out[0, ids.shape[1]:]
    assert result["new_tokens"] == expected.numel() and 1 <= result["new_tokens"] <= 6
    assert result["completion"] == tok.decode(expected, skip_special_tokens=True)


def test_plain_output_and_chat_without_a_template(in_process, capsys, tiny_checkpoint):
    assert in_process(["generate", str(tiny_checkpoint[1]), "--prompt", PROMPT, "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    assert in_process(["generate", str(tiny_checkpoint[1]), "--prompt", PROMPT, "--chat"]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_truncated_weights_are_a_usage_error_naming_the_file(in_process, capsys, truncated_checkpoint):
    assert in_process(["generate", str(truncated_checkpoint), "--prompt", PROMPT, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{truncated_checkpoint / 'model.safetensors'} is not a valid safetensors file (truncated" in err
    assert "Traceback" not in err


def test_max_new_tokens_is_capped_by_the_model_positions(in_process, capsys, tiny_checkpoint):
    huge = "99999999999999999999999"
    assert in_process(["generate", str(tiny_checkpoint[1]), "--prompt", PROMPT, "--max-new-tokens", huge]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens: the prompt plus --max-new-tokens is" in err and "maximum of 256 positions" in err


def test_a_truncated_config_is_a_usage_error_naming_the_file(in_process, capsys, truncated_config_checkpoint):
    assert in_process(["generate", str(truncated_config_checkpoint), "--prompt", PROMPT, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{truncated_config_checkpoint / 'config.json'} is not valid JSON" in err and "Traceback" not in err


def test_a_prompt_that_is_not_utf8_is_a_usage_error(tiny_checkpoint):
    import os
    import subprocess
    import sys

    from tests.cli.conftest import REPO

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "bpdq.cli", "generate", str(tiny_checkpoint[1]).encode(), "--prompt",
                           b"caf\xe9 au lait", "--device", "cpu"], env=env, capture_output=True, timeout=300)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, err
    assert "--prompt is not valid UTF-8" in err and "Traceback" not in err


def test_a_checkpoint_without_a_tokenizer_needs_the_tokenizer_flag(in_process, capsys, tokenizerless_checkpoint,
                                                                     tiny_model_dir):
    args = ["generate", str(tokenizerless_checkpoint), "--prompt", PROMPT, "--max-new-tokens", "3", "--device", "cpu"]
    assert in_process(args) == 2
    err = capsys.readouterr().err
    assert f"{tokenizerless_checkpoint} has no tokenizer" in err and "--tokenizer" in err and "Traceback" not in err
    assert in_process([*args, "--tokenizer", str(tiny_model_dir)]) == 0
    assert capsys.readouterr().out.strip()
