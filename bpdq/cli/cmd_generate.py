"""``bpdq generate DIR --prompt TEXT``: greedy generation from a bpdq checkpoint."""

from __future__ import annotations

import argparse
import time
from typing import Any

from bpdq.cli.console import emit_json
from bpdq.cli.errors import UsageError, usage_phase
from bpdq.cli.runtime import check_utf8, device_for, load_checkpoint, load_plugins, positive_int, tokenizer_for


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "generate",
        parents=[common],
        help="greedy text generation from a bpdq checkpoint",
        description="Greedy (deterministic) generation from a bpdq checkpoint. With --chat the prompt is "
        "wrapped in the tokenizer's chat template as a user message.",
    )
    p.add_argument("directory", metavar="DIR", help="a bpdq checkpoint directory")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                   help="tokens to generate (default 64); the prompt plus N must fit the model's positions")
    p.add_argument("--chat", action="store_true", help="use the tokenizer's chat template (if it has one)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--tokenizer", metavar="DIR_OR_HUB_ID", default=None,
                   help="the tokenizer to use (default: the model's own; needed for a checkpoint saved without one)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(run=run)


def _encode(tokenizer: Any, prompt: str, chat: bool) -> Any:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("--chat: this checkpoint's tokenizer has no chat template; drop --chat")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def run(args: argparse.Namespace) -> int:
    import torch

    from bpdq.models import check_positions

    load_plugins(args.plugin)
    check_utf8(args.prompt, "--prompt")
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    device = device_for(args.device)
    model, tokenizer = load_checkpoint(args.directory, device)
    tokenizer = tokenizer_for(args.directory, tokenizer, args.tokenizer)
    ids = _encode(tokenizer, args.prompt, args.chat).to(device)
    with usage_phase("--max-new-tokens"):
        check_positions(model, ids.shape[1] + args.max_new_tokens, "the prompt plus --max-new-tokens")
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    new = out[0, ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    if args.json:
        emit_json({
            "prompt": args.prompt,
            "chat": args.chat,
            "completion": text,
            "new_tokens": int(new.numel()),
            "time_s": time.perf_counter() - start,
        })
    else:
        print(text)
    return 0
