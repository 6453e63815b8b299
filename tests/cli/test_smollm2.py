"""Every command on the real SmolLM2-135M (built-in alias): quantize layer 0 with RTN (data-free: the
calibration block is not used), then eval, inspect and generate from the checkpoint it wrote."""

from __future__ import annotations

import pytest

from tests.cli.conftest import json_stdout, run_cli, run_many, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    pytest.importorskip("gguf")
    d = tmp_path_factory.mktemp("smollm2")
    cfg = write_config(d / "rtn.yaml", {
        "model": "smollm2-135m",
        "calibration": {"text": "builtin:python-docs", "samples": 2, "seq_len": 64, "seed": 0},
        "quantize": {"group_size": 64, "grid": {"type": "bitplane", "planes": 2}, "solver": "rtn"},
        "rules": [{"match": r"model\.layers\.([1-9]|[12][0-9])\..*", "skip": True}],
        "output": str(d / "ckpt"),
        "device": "cpu",
    })
    summary = json_stdout(run_cli("quantize", str(cfg), "--json"))
    ckpt = str(d / "ckpt")
    runs = run_many({
        "eval": ["eval", ckpt, "--text", "builtin:python-docs-test", "--seq-len", "64", "--max-windows", "2", "--json"],
        "inspect": ["inspect", ckpt, "--json"],
        "generate": ["generate", ckpt, "--prompt", "What is Python?", "--chat", "--max-new-tokens", "4", "--json"],
    })
    return summary, {name: json_stdout(proc) for name, proc in runs.items()}


def test_quantize_summary(smol):
    summary, _ = smol
    assert (summary["modules_quantized"], summary["modules_skipped"]) == (7, 29 * 7)
    assert summary["avg_bpw_quantized"] == pytest.approx(2 + 16 * 3 / 64)
    assert 2.75 < summary["avg_bpw_model"] < 16
    assert summary["worst_modules"] == []  # RTN runs data-free: no Hessian, so no proxy loss to rank by


def test_eval_checkpoint(smol):
    result = smol[1]["eval"]
    assert result["quantized"] is True and result["windows"] == 2
    assert 1.0 < result["perplexity"] < 200.0  # a working language model, not a broken one (vocab 49152)


def test_inspect_checkpoint(smol):
    info = smol[1]["inspect"]
    assert info["architecture"] == "LlamaForCausalLM" and info["solvers"] == ["rtn"]
    quantized = [m["name"] for m in info["modules"] if not m["skipped"]]
    assert len(quantized) == 7 and all(n.startswith("model.layers.0.") for n in quantized)


def test_generate_with_chat_template(smol):
    result = smol[1]["generate"]
    assert result["chat"] is True and 1 <= result["new_tokens"] <= 4
    assert result["completion"].strip()
