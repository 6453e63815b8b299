"""``bpdq quantize`` refuses bad inputs with exit 2 before any work (bpdq/cli/cmd_quantize.py): a model
directory whose config.json disagrees with its weights, rules that skip every linear, a calibration window
longer than the model's positions, a kernel that cannot run on the device."""

from __future__ import annotations

import json
import shutil

from tests.cli.conftest import tiny_strategy, write_config


def test_a_config_disagreeing_with_the_weights_is_a_usage_error_naming_config_json(in_process, capsys, tmp_path,
                                                                                   tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1_000_000_000}))
    cfg = write_config(tmp_path / "s.yaml", tiny_strategy(model, tmp_path / "out"))
    assert in_process(["quantize", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{model / 'config.json'} disagrees with the weights" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_rules_that_skip_every_linear_are_a_usage_error(in_process, capsys, tmp_path, tiny_model_dir):
    data = tiny_strategy(tiny_model_dir, tmp_path / "out", rules=[{"match": ".*", "skip": True}])
    assert in_process(["quantize", str(write_config(tmp_path / "s.yaml", data))]) == 2
    err = capsys.readouterr().err
    assert "the rules skip all 14 decoder linears" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_a_calibration_window_beyond_the_positions_is_a_usage_error(in_process, capsys, tmp_path, tiny_model_dir):
    data = tiny_strategy(tiny_model_dir, tmp_path / "out")
    data["quantize"]["solver"] = {"type": "gptq"}
    data["calibration"]["seq_len"] = 512
    assert in_process(["quantize", str(write_config(tmp_path / "s.yaml", data))]) == 2
    err = capsys.readouterr().err
    assert "calibration seq_len is 512 tokens, beyond the model's maximum of 256 positions" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_a_kernel_that_cannot_run_on_the_device_is_a_usage_error(in_process, capsys, tmp_path, tiny_model_dir,
                                                                  monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = write_config(tmp_path / "s.yaml", tiny_strategy(tiny_model_dir, tmp_path / "out"))
    assert in_process(["quantize", str(cfg), "--set", "quantize.kernel=triton_gemm"]) == 2
    err = capsys.readouterr().err
    assert "kernel 'triton_gemm' cannot run on cpu" in err and "Triton kernels need a CUDA device" in err
    assert "kernels that run on cpu: auto, " in err and "torch" in err.split("kernels that run on cpu:")[1]
    assert "triton" not in err.split("kernels that run on cpu:")[1] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_a_rank_of_a_distributed_run_refuses_a_bad_input_before_joining_the_group(tmp_path, tiny_model_dir):
    """Alone, a rank that joined its process group would wait for the other one: it must exit 2 first."""
    import os
    import subprocess
    import sys

    from tests.cli.conftest import REPO
    from tests.engine.test_distributed import free_port

    data = tiny_strategy(tiny_model_dir, tmp_path / "out")
    data["quantize"]["solver"] = {"type": "gptq"}
    data["calibration"]["seq_len"] = 512
    cfg = write_config(tmp_path / "s.yaml", data)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-m", "bpdq.cli", "quantize", str(cfg)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "calibration seq_len is 512 tokens, beyond the model's maximum of 256 positions" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_a_model_directory_without_a_tokenizer_quantizes_data_free_only(in_process, capsys, tmp_path, tiny_model_dir):
    import bpdq

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    for p in model.iterdir():
        if p.name.startswith("tokenizer") or p.name in ("special_tokens_map.json", "chat_template.jinja"):
            p.unlink()
    data = tiny_strategy(model, tmp_path / "out")
    data["quantize"]["solver"] = {"type": "gptq"}
    assert in_process(["quantize", str(write_config(tmp_path / "gptq.yaml", data))]) == 2
    err = capsys.readouterr().err
    assert f"{model} has no tokenizer" in err and "calibration" in err and not (tmp_path / "out").exists()
    assert in_process(["quantize", str(write_config(tmp_path / "rtn.yaml", tiny_strategy(model, tmp_path / "out")))]) == 0
    loaded, tokenizer = bpdq.load(tmp_path / "out")
    assert tokenizer is None and loaded.config.quantization_config["quant_method"] == "bpdq"
