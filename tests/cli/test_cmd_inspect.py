"""``bpdq inspect`` on the tiny checkpoint (bpdq/cli/cmd_inspect.py)."""

from __future__ import annotations

import json

import pytest

from bpdq.report import RunReport
from tests.cli.conftest import run_cli


@pytest.fixture(scope="module")
def info(tiny_checkpoint):
    proc = run_cli("inspect", str(tiny_checkpoint[1]), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_method_sizes_and_totals(info, tiny_checkpoint):
    out = tiny_checkpoint[1]
    report = RunReport.read(out / "bpdq_report.json")
    assert (info["quant_method"], info["format_version"], info["solvers"], info["grids"]) == ("bpdq", 1, ["rtn"], ["bitplane"])
    assert info["architecture"] == "LlamaForCausalLM"
    assert (info["modules_quantized"], info["modules_skipped"]) == (13, 1)
    assert info["checkpoint_bytes"] == (out / "model.safetensors").stat().st_size
    assert info["fp16_bytes"] == report.fp16_bytes
    assert info["avg_bpw_quantized"] == pytest.approx(report.avg_bpw_quantized)


def test_recipe_bpw_and_loss_per_module(info, tiny_checkpoint):
    report = {m.name: m for m in RunReport.read(tiny_checkpoint[1] / "bpdq_report.json").modules}
    modules = {m["name"]: m for m in info["modules"]}
    assert list(modules) == list(report)  # every module, in the pipeline's order
    down = modules["model.layers.0.mlp.down_proj"]
    assert down["planes"] == 3 and down["recipe"]["grid"]["planes"] == 3 and down["bits_per_weight"] == 5.0
    assert modules["model.layers.1.self_attn.o_proj"]["skipped"] is True
    q = modules["model.layers.1.self_attn.q_proj"]
    assert (q["planes"], q["recipe"]["group_size"], q["bits_per_weight"]) == (2, 32, 3.5)
    for name, m in modules.items():
        assert m["proxy_loss"] == report[name].proxy_loss and m["relative_loss"] == report[name].relative_loss


def test_plain_output_is_a_table(in_process, capsys, tiny_checkpoint):
    assert in_process(["inspect", str(tiny_checkpoint[1])]) == 0
    out = capsys.readouterr().out
    assert "bpdq (format 1, bpdq " in out and "skipped (full precision)" in out
    assert "bitplane(init_bits=8,planes=3) rtn(refits=2) g=32" in out


def test_truncated_weights_are_a_usage_error_naming_the_file(in_process, capsys, truncated_checkpoint):
    assert in_process(["inspect", str(truncated_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert f"{truncated_checkpoint / 'model.safetensors'} is not a valid safetensors file (truncated" in err
    assert "Traceback" not in err


def test_a_sharded_checkpoint_is_described_with_all_its_shards(tiny_checkpoint, tmp_path):
    import bpdq

    model, tok = bpdq.load(tiny_checkpoint[1])
    sharded = bpdq.save(model, tok, tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    proc = run_cli("inspect", str(sharded), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["modules_quantized"] == 13
    assert info["checkpoint_bytes"] == sum(p.stat().st_size for p in shards)


@pytest.mark.parametrize("name, change, expected", [
    ("model.norm.weight", lambda t: t.double(), "has dtype torch.float64, the model expects torch.float32"),
    ("model.layers.0.self_attn.q_proj.planes", lambda t: t.int(), "has dtype torch.int32, the model expects torch.uint8"),
    ("model.layers.1.mlp.up_proj.coeffs", lambda t: t[:, :1].contiguous(), "has shape"),
])
def test_wrong_tensor_dtypes_or_shapes_are_a_usage_error(in_process, capsys, tmp_path, tiny_checkpoint, name, change,
                                                          expected):
    import shutil

    from safetensors.torch import load_file, save_file

    path = shutil.copytree(tiny_checkpoint[1], tmp_path / "bad")
    tensors = load_file(str(path / "model.safetensors"))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    assert in_process(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"tensor {name!r}" in err and expected in err and "model.safetensors" in err and "Traceback" not in err
