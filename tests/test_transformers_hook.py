"""bpdq/_transformers_hook.py: ``from_pretrained`` loads bpdq checkpoints after ``import bpdq``, whether
transformers' quantizers are imported before or after bpdq, without ``import bpdq`` importing them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import bpdq
from tests.tiny_models import TINY_CALIBRATION, TINY_RECIPE, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, tok = tiny_model("llama", layers=1), tiny_tokenizer()
    bpdq.quantize_model(model, tok, recipe=TINY_RECIPE, calibration=TINY_CALIBRATION, progress=False)
    return bpdq.save(model, tok, tmp_path_factory.mktemp("hook") / "ckpt")


@pytest.mark.parametrize(
    "prelude",
    ["import bpdq", "import transformers.quantizers\nimport bpdq", "import transformers\nimport bpdq"],
    ids=["bpdq-first", "quantizers-first", "transformers-first"],
)
def test_from_pretrained_gives_quantlinear(checkpoint, prelude):
    script = (
        f"import json, sys\n{prelude}\n"
        "lazy = 'transformers.quantizers' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r})\n"
        "print(json.dumps([lazy, type(model.model.layers[0].mlp.down_proj).__name__]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    lazy, layer = json.loads(done.stdout.strip().splitlines()[-1])
    assert layer == "QuantLinear"
    assert lazy is (prelude != "import transformers.quantizers\nimport bpdq")
