"""``bpdq export`` (bpdq/cli/cmd_export.py): its refusals name the command line's flags and never touch the
model."""

from __future__ import annotations

import shutil


def test_a_full_output_or_the_model_itself_is_refused_with_exit_2(in_process, capsys, tmp_path, tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, tmp_path / "src")
    before = sorted(p.name for p in model.iterdir())
    assert in_process(["export", str(model), str(model)]) == 2
    assert "is not empty; pass --overwrite to replace it" in capsys.readouterr().err
    assert in_process(["export", str(model), str(model), "--overwrite"]) == 2
    assert f"output '{model}' is the model '{model}'" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == before and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
