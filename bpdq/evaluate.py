"""Perplexity over non-overlapping windows: the same protocol for full-precision and quantized models.

The text is tokenized once (no special tokens) and cut into consecutive windows of ``seq_len`` tokens (the
incomplete tail is dropped); each window is scored independently, predicting its tokens 2..seq_len from
the ones before them. Perplexity is ``exp(total negative log-likelihood / number of predicted tokens)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bpdq.calibration import tokenize


def eval_windows(tokenizer: Any, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """``[n, seq_len]`` consecutive non-overlapping windows of ``text``'s tokens."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("perplexity needs a non-empty text")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be a positive int or None, got {max_windows!r}")
    ids = tokenize(tokenizer, text)
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    *,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
) -> float:
    """Perplexity of ``model`` on ``text`` (see the module docstring for the protocol)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    windows = eval_windows(tokenizer, text, seq_len, max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    model.train(was_training)
    return math.exp(nll / count)
