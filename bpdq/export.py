"""Export a model that transformers cannot ``save_pretrained`` (a GGUF file, the built-in ``smollm2-135m``)
as an ordinary safetensors model directory, which ``bpdq quantize`` then reads one layer at a time.

transformers refuses ``save_pretrained`` of a GGUF-loaded model, so the model is rebuilt from its config and
given the loaded state dict; the directory is written atomically (temporary directory, then a rename).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bpdq.shards import DEFAULT_MAX_SHARD_SIZE, parse_size


def export_model(
    name_or_path: str,
    output: str | Path,
    *,
    dtype: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write ``name_or_path`` (alias, GGUF file, model directory or hub id) to ``output`` as ``config.json``,
    safetensors shards of at most ``max_shard_size`` and the tokenizer files; returns ``output``."""
    from transformers import AutoModelForCausalLM

    from bpdq.experts import QuantExperts
    from bpdq.linear import QuantLinear
    from bpdq.models import load_pretrained
    from bpdq.engine.sink import OutputDir

    size = parse_size(max_shard_size)
    source = Path(name_or_path).expanduser()
    out = OutputDir(output, overwrite=overwrite, inputs={"model": source if source.exists() else None})
    try:
        model, tokenizer = load_pretrained(name_or_path, dtype=dtype)
        if any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules()):
            raise ValueError(f"{name_or_path!r} is a quantized checkpoint; export takes a full-precision model")
        plain = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
        plain.load_state_dict(model.state_dict())
        del model
        plain.save_pretrained(str(out.tmp), max_shard_size=size)
        tokenizer.save_pretrained(str(out.tmp))
        return out.commit()
    except BaseException:
        out.abort()
        raise
