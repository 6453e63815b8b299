"""What the examples in this folder share (not an example itself): the tiny random Llama they quantize and
the byte-level tokenizer that turns the calibration text into its token ids.

An example imports them in its ``main()``, after putting this folder on ``sys.path`` (``python
docs/examples/add_grid.py`` does that already; importing an example as a ``--plugin`` never runs ``main()``).
"""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0):
    """A random 2-layer Llama with 64 hidden units and a 256-token vocabulary, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


class ByteTokenizer:
    """Enough of a tokenizer for the calibration windows: one token per byte of the text (the tiny models'
    256-token vocabularies hold every byte)."""

    def __call__(self, text: str, **_kwargs):
        return {"input_ids": list(text.encode("utf-8"))}
