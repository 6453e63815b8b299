"""Perplexity over non-overlapping windows: the same protocol for full-precision and quantized models.

The text is tokenized once (no special tokens) and cut into consecutive windows of ``seq_len`` tokens (the
incomplete tail is dropped); each window is scored independently, predicting its tokens 2..seq_len from
the ones before them. Perplexity is ``exp(total negative log-likelihood / number of predicted tokens)``.

The loss is computed from the decoder's hidden states through the output projection in chunks of
``LOSS_CHUNK`` tokens, so no ``[batch, seq_len, vocab]`` fp32 logits tensor is ever materialised (about
4 GB for 4 x 2048 tokens at a 128k vocabulary); models that soft-cap or scale their logits
(``final_logit_softcapping``, ``logit_scale``) get the same treatment per chunk.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bpdq.calibration import tokenize
from bpdq.models.base import check_positions

#: Tokens whose logits are computed at once (fp32 logits of one chunk: ``LOSS_CHUNK * vocab * 4`` bytes).
LOSS_CHUNK = 1024


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
    check_positions(model, seq_len, "seq_len")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        hidden = model.get_decoder()(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
        targets = batch[:, 1:]
        nll += chunked_nll(model, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1))
        count += targets.numel()
    model.train(was_training)
    return math.exp(nll / count)


def chunked_nll(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> float:
    """Summed negative log-likelihood of ``targets [n]`` given final hidden states ``hidden [n, d]``, with the
    logits of at most ``chunk`` (default :data:`LOSS_CHUNK`) tokens in memory at a time."""
    chunk = chunk or LOSS_CHUNK
    head = model.get_output_embeddings()
    config = model.config
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    total = 0.0
    for h, t in zip(hidden.split(chunk), targets.split(chunk)):
        logits = head(h)  # the model's own order of operations, in its dtype, then fp32 for the loss
        if scale is not None:
            logits = logits * scale
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        total += float(F.cross_entropy(logits.float(), t, reduction="sum"))
    return total
