"""Add a model adapter: Phi (``PhiForCausalLM``), whose attention and MLP run in parallel.

A Phi decoder layer feeds the same normalised input to ``q_proj``, ``k_proj``, ``v_proj`` *and* ``mlp.fc1``,
so those four form the first sequential group; the attention output projection is called ``dense`` and the
final norm ``model.final_layernorm``. The adapter is data: where the decoder layers live, the sequential
groups of linears, the final norm and the output head. Importing this file registers it (so
``bpdq quantize --plugin docs/examples/add_model.py`` works for a Phi checkpoint); running it quantizes a
tiny random Phi from Python and from a config (``bpdq.QuantizeConfig.from_dict``).
See docs/guides/add-a-model.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import bpdq
from bpdq.models import Adapter, get_adapter, register_adapter

PHI = register_adapter(
    Adapter(
        "PhiForCausalLM",  # the `architectures` entry of the transformers config
        layers="model.layers",
        groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"),  # same input
            ("self_attn.dense",),
            ("mlp.fc2",),
        ),
        norm="model.final_layernorm",
        head="lm_head",
    )
)


def tiny_phi(seed: int = 0):
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128,
    )
    config.architectures = ["PhiForCausalLM"]
    torch.manual_seed(seed)
    return PhiForCausalLM(config).eval()


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _example_utils import ByteTokenizer  # the byte-level tokenizer of every example

    model = tiny_phi()
    print("adapter:", get_adapter(model))
    print("sequential groups of layer 0:", PHI.linear_groups(model.model.layers[0]))
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        reference = model(ids).logits

    # 1. From Python: GPTQ at 4 bits (uniform grid), every decoder linear.
    config = bpdq.QuantizeConfig(
        quantize={"group_size": 32, "grid": {"type": "uniform", "bits": 4}, "solver": "gptq"},
        calibration={"samples": 4, "seq_len": 32}, device="cpu", progress=False,
    )
    report = bpdq.quantize(model, config, tokenizer=ByteTokenizer())
    with torch.no_grad():
        drift = (model(ids).logits - reference).abs().max().item()
    print(f"quantized {report.n_quantized} linears at {report.avg_bpw_quantized:.3f} bpw; "
          f"max logit change {drift:.3f} (logits span {reference.abs().max().item():.3f})")
    if report.n_quantized != 2 * 6:
        raise SystemExit(f"expected 6 linears per layer, 2 layers; got {report.n_quantized}")

    # 2. From a config (the fields of a strategy file, less `model:`): 2-bit BPDQ (2 iterations to stay
    #    fast), layer 0 left in full precision.
    config = bpdq.QuantizeConfig.from_dict({
        "quantize": {"group_size": 32, "grid": {"type": "bitplane", "planes": 2},
                     "solver": {"type": "bpdq", "iters": 2}},
        "rules": [{"match": r"model\.layers\.0\..*", "skip": True}],
        "calibration": {"samples": 4, "seq_len": 32}, "device": "cpu", "progress": False,
    })
    model = tiny_phi()
    report = bpdq.quantize(model, config, tokenizer=ByteTokenizer())
    print(f"with the config: {report.n_quantized} quantized, {report.n_skipped} skipped (layer 0)")
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, bpdq.QuantLinear))
    if report.n_skipped != 6 or not all(n.startswith("model.layers.1.") for n in quantized):
        raise SystemExit(f"expected layer 0 skipped and layer 1 quantized, got {quantized}")


if __name__ == "__main__":
    main()
