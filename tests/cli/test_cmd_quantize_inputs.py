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
