"""Calibration text and token windows.

Text comes from a ``.txt`` file, a ``.jsonl`` file with a ``"text"`` field per line, a directory of those,
or a built-in source that is always available offline:

- ``builtin:python-docs``: English prose from the Python standard library's ``pydoc_data/topics.py``
  (the calibration split);
- ``builtin:python-docs-test``: the held-out split of the same source, with no topic in common with the
  calibration split (for perplexity).

``calibration_windows`` tokenizes the text once and draws ``samples`` windows of ``seq_len`` tokens at
positions chosen by a seeded generator, so the same config always gives the same windows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from bpdq.config import CalibrationConfig

TEXT_SUFFIXES = (".txt", ".jsonl")
_HELD_OUT_EVERY = 4  # every 4th topic (sorted by name) belongs to the held-out split


def _python_docs(held_out: bool) -> str:
    """Topics are split by name (every 4th, sorted, is held out). Some topics repeat paragraphs of others;
    the calibration split drops every paragraph that also occurs in the held-out split."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    test_names = names[_HELD_OUT_EVERY - 1 :: _HELD_OUT_EVERY]
    test_paras = [p for n in test_names for p in topics[n].strip().split("\n\n")]
    if held_out:
        return "\n\n".join(test_paras)
    taken = set(test_paras)
    cal_names = [n for n in names if n not in set(test_names)]
    return "\n\n".join(p for n in cal_names for p in topics[n].strip().split("\n\n") if p not in taken)


BUILTIN_TEXTS: dict[str, Callable[[], str]] = {
    "python-docs": lambda: _python_docs(held_out=False),
    "python-docs-test": lambda: _python_docs(held_out=True),
}


def _read_jsonl(path: Path) -> str:
    texts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{lineno}: each line must be a JSON object with a string 'text' field")
        texts.append(record["text"])
    return "\n\n".join(texts)


def _read_file(path: Path) -> str:
    if path.suffix not in TEXT_SUFFIXES:
        raise ValueError(f"calibration file {path} must end in one of {list(TEXT_SUFFIXES)}")
    try:
        text = _read_jsonl(path) if path.suffix == ".jsonl" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read calibration file {path}: {exc}") from None
    if not text.strip():
        raise ValueError(f"calibration file {path} is empty")
    return text


def load_text(spec: str) -> str:
    """The text named by ``spec``: ``builtin:NAME``, a ``.txt``/``.jsonl`` file, or a directory of those."""
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"calibration text must be a non-empty string (a path or builtin:NAME), got {spec!r}")
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_TEXTS:
            known = ", ".join(f"builtin:{n}" for n in BUILTIN_TEXTS)
            raise ValueError(f"unknown built-in text {spec!r}; known: {known}")
        return BUILTIN_TEXTS[name]()
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"calibration directory {path} holds no {' or '.join(TEXT_SUFFIXES)} files")
        return "\n\n".join(_read_file(p) for p in files)
    if not path.exists():
        raise ValueError(
            f"calibration text {spec!r} is not an existing file or directory, nor builtin:NAME "
            f"(known: {', '.join('builtin:' + n for n in BUILTIN_TEXTS)})"
        )
    return _read_file(path)


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """All token ids of ``text`` as one 1-D ``int64`` tensor (no special tokens, no length warning)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def calibration_windows(tokenizer: Any, config: CalibrationConfig | dict[str, Any]) -> list[torch.Tensor]:
    """``config.samples`` 1-D windows of ``config.seq_len`` token ids, deterministic for ``config.seed``."""
    if isinstance(config, dict):
        config = CalibrationConfig(**config)
    if not isinstance(config, CalibrationConfig):
        raise TypeError(f"config must be a CalibrationConfig or a dict, got {type(config).__name__}")
    ids = tokenize(tokenizer, load_text(config.text))
    if ids.numel() < config.seq_len:
        raise ValueError(
            f"calibration text {config.text!r} has {ids.numel()} tokens, fewer than seq_len={config.seq_len}; "
            f"give more text or a smaller seq_len"
        )
    gen = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, ids.numel() - config.seq_len + 1, (config.samples,), generator=gen)
    return [ids[s : s + config.seq_len].clone() for s in starts.tolist()]
