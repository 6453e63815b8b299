"""Add a stage: measure how far each quantized decoder layer's output is from the full-precision layer's.

``LayerError`` keeps a full-precision copy of each layer before it is solved (``before_solve``), compares the
two layers' outputs on the first calibration batch once the layer is solved (``observe``: it reads the layer
and changes nothing), drops the copy, and puts the relative errors into the run's report (``finish``).
Importing this file registers it (``bpdq quantize --plugin docs/examples/add_stage.py`` with ``stages:
[layer_error]`` in the config); running it quantizes a tiny random Llama with GPTQ and prints the error per
layer, once with the stage given to ``bpdq.quantize`` and once named in the config.
See docs/guides/add-a-stage.md.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

import bpdq
from bpdq.batch import to_device


@bpdq.STAGES.register("layer_error")
class LayerError(bpdq.Stage):
    """Relative output error ``||y_q - y|| / ||y||`` of each decoder layer on its first calibration batch."""

    def __init__(self) -> None:
        self.errors: dict[str, float] = {}
        self._copy: torch.nn.Module | None = None

    def before_solve(self, step: bpdq.LayerStep) -> None:
        self._copy = copy.deepcopy(step.layer) if step.inputs is not None else None

    def observe(self, step: bpdq.LayerStep) -> None:
        if self._copy is None:
            return
        batch = step.inputs[0]
        args = (batch.hidden.to(step.device), *to_device(batch.args, step.device))
        kwargs = to_device(batch.kwargs, step.device)
        outputs = [layer(*args, **kwargs) for layer in (step.layer, self._copy)]
        y_q, y = (out[0] if isinstance(out, tuple) else out for out in outputs)
        self.errors[step.prefix] = float((y_q - y).norm() / y.norm())
        self._copy = None

    def finish(self, report: bpdq.RunReport) -> None:
        report.extra[self.name] = self.errors


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _example_utils import ByteTokenizer, tiny_llama  # the tiny random Llama and tokenizer of every example

    config = bpdq.QuantizeConfig(
        quantize={"group_size": 32, "grid": {"type": "uniform", "bits": 4}, "solver": "gptq"},
        calibration={"samples": 4, "seq_len": 32}, device="cpu", progress=False,
    )
    report = bpdq.quantize(tiny_llama(), config, tokenizer=ByteTokenizer(), stages=[LayerError()])
    errors = report.extra["layer_error"]
    for layer, error in errors.items():
        print(f"{layer}: relative output error {error:.4f}")
    if sorted(errors) != ["model.layers.0", "model.layers.1"] or not all(0 < e < 1 for e in errors.values()):
        raise SystemExit(f"expected a small, nonzero error for both layers, got {errors}")
    named = bpdq.quantize(tiny_llama(), config.model_copy(update={"stages": ["layer_error"]}), tokenizer=ByteTokenizer())
    if named.extra["layer_error"] != errors:
        raise SystemExit("the stage named in the config must measure the same errors")


if __name__ == "__main__":
    main()
