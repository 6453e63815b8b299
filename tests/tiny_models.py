"""Tiny random Llama / Qwen2 / Qwen3 models and a small BPE tokenizer trained on the built-in text
(everything offline and fast)."""

from __future__ import annotations

import functools

import torch

ARCHITECTURES = ("llama", "qwen2", "qwen3")
#: Mixtures of experts (8 experts of intermediate size 32, 2 active; Qwen2-MoE with a shared expert of 64).
MOE_ARCHITECTURES = ("qwen3_moe", "qwen2_moe", "mixtral")


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from bpdq.calibration import load_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<unk>", "<eos>"], show_progress=False)
    tok.train_from_iterator([load_text("builtin:python-docs")[:200_000]], trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def tiny_model(arch: str = "llama", *, layers: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes):
    """A randomly initialised causal LM of the given family (hidden 64, intermediate 128; ``sizes`` overrides
    config fields such as ``hidden_size``): llama, qwen2, qwen3 (registered adapters), mistral, gemma
    (Llama-shaped, served by the fallback), phi3 (fused projections) or a mixture of experts of
    ``MOE_ARCHITECTURES``."""
    import transformers

    common = dict(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ) | sizes
    family = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "gemma": "Gemma", "phi3": "Phi3",
              "qwen3_moe": "Qwen3Moe", "qwen2_moe": "Qwen2Moe", "mixtral": "Mixtral"}
    config_cls = getattr(transformers, f"{family[arch]}Config")
    model_cls = getattr(transformers, f"{family[arch]}ForCausalLM")
    extra: dict = {"head_dim": 16} if arch in ("qwen3", "gemma", "qwen3_moe") else {}
    if arch in ("qwen3_moe", "qwen2_moe"):
        extra.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
    if arch == "qwen2_moe":
        extra.update(shared_expert_intermediate_size=64)
    if arch == "mixtral":
        extra.update(num_local_experts=8, num_experts_per_tok=2)
        common["intermediate_size"] = sizes.get("intermediate_size", 32)
    if arch == "phi3":
        extra.update(pad_token_id=None, eos_token_id=None, bos_token_id=None)
    config = config_cls(**common, **extra)
    config.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    return model


TINY_CALIBRATION = {"text": "builtin:python-docs", "samples": 8, "seq_len": 32, "seed": 0, "asymmetric": False}
TINY_RECIPE = {"group_size": 32, "grid": {"type": "bitplane", "planes": 2}, "solver": "rtn"}


def tiny_model_dir(directory, arch: str = "llama", *, layers: int = 2, max_shard_size: str = "100KB", **kwargs):
    """A tiny model (and the tiny tokenizer) written by ``save_pretrained`` as sharded safetensors."""
    model = tiny_model(arch, layers=layers, **kwargs)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    tiny_tokenizer().save_pretrained(directory)
    return directory
