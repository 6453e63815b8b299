"""bpdq checkpoints for the vLLM tests, built fast with the RTN solver (the plugin is under test, not the solver).

- ``smollm2``: SmolLM2-135M-Instruct, 2-bit bit-plane grid, g=64 (``mixed=True``: ``v_proj`` and ``down_proj`` at
  3 bits, so the fused ``qkv_proj`` holds a 3-plane part beside 2-plane ones);
- ``tiny_llama``: a random Llama whose 4 attention heads (2 KV heads) divide by 2, for tensor parallelism, with
  the tokenizer given (SmolLM2's in the tests); ``intermediate`` and ``group_size`` choose whether a 2-way split of ``down_proj``'s
  inputs falls on group boundaries.
- ``tiny_moe``: a random Qwen3-MoE, Qwen2-MoE (with a shared expert) or Mixtral (8 experts, 2 active, 2 layers;
  head size 32, which vLLM's CPU attention supports) with the tiny tokenizer of ``tests/tiny_models.py``, every
  expert quantized.
"""

from __future__ import annotations

from pathlib import Path

import torch

import bpdq
from bpdq.models import load_pretrained

# refits=0: codes and coefficients straight from the uniform start (refitting is slow and not under test here)
RTN2 = {"group_size": 64, "grid": {"type": "bitplane", "planes": 2}, "solver": {"type": "rtn", "refits": 0}}
CALIBRATION = {"text": "builtin:python-docs", "samples": 2, "seq_len": 32, "seed": 0}
MIXED_RULES = [{"match": r".*\.(v_proj|down_proj)", "grid": {"type": "bitplane", "planes": 3}}]


def smollm2(directory: Path, *, mixed: bool = False) -> Path:
    model, tok = load_pretrained("smollm2-135m", dtype="float32")
    model.config.quantization_config = None  # the GGUF source's; the bpdq checkpoint writes its own
    bpdq.quantize_model(model, tok, recipe=RTN2, calibration=CALIBRATION, rules=MIXED_RULES if mixed else (),
                        device="cpu", progress=False)
    return bpdq.save(model, tok, directory)


def tiny_llama(directory: Path, tok, *, intermediate: int = 512, group_size: int = 64, seed: int = 0) -> Path:
    """``tok``: the tokenizer to save with it (SmolLM2's, so that vLLM and bpdq see the same windows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        # a wide initialisation gives peaked next-token distributions, so that a wrong shard shows in perplexity
        initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    recipe = dict(RTN2, group_size=group_size)
    bpdq.quantize_model(model, tok, recipe=recipe, calibration=CALIBRATION, device="cpu", progress=False)
    return bpdq.save(model, tok, directory)


MOE_RTN2 = {"group_size": 32, "grid": {"type": "bitplane", "planes": 2}, "solver": {"type": "rtn", "refits": 0}}


def tiny_moe(directory: Path, arch: str = "qwen3_moe", *, seed: int = 0) -> Path:
    """A random mixture of experts (``qwen3_moe``, ``qwen2_moe`` or ``mixtral``), quantized and written to
    ``directory``."""
    import transformers

    from tests.tiny_models import TINY_CALIBRATION, tiny_tokenizer

    tok = tiny_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=512, tie_word_embeddings=True,
                  num_experts_per_tok=2, initializer_range=0.2, eos_token_id=tok.eos_token_id)
    if arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, intermediate_size=256, moe_intermediate_size=64, num_experts=8,
                                             norm_topk_prob=True)
        cls = transformers.Qwen3MoeForCausalLM
    elif arch == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**common, intermediate_size=256, moe_intermediate_size=64, num_experts=8,
                                             shared_expert_intermediate_size=128, norm_topk_prob=True)
        cls = transformers.Qwen2MoeForCausalLM
    elif arch == "mixtral":
        config = transformers.MixtralConfig(**common, intermediate_size=64, num_local_experts=8)
        cls = transformers.MixtralForCausalLM
    else:
        raise ValueError(f"arch must be 'qwen3_moe', 'qwen2_moe' or 'mixtral', got {arch!r}")
    config.architectures = [cls.__name__]
    torch.manual_seed(seed)
    model = cls(config).eval()
    bpdq.quantize(model, {"calibration": TINY_CALIBRATION, "quantize": MOE_RTN2, "progress": False,
                          "output": str(directory)}, tokenizer=tok)
    return directory
