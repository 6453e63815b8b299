"""Where a run's results go: the modules swapped in place (always), and optionally a checkpoint directory
written as the run goes.

:class:`OutputDir` is the atomic part: the checkpoint is built in a hidden temporary directory beside the
target (``.NAME.tmp-*``) and renamed into place at the end; any failure removes it. Stale temporary
directories of the same target (left by a killed process) are removed when the next one is made, under the
output's lock (:mod:`bpdq.engine.lock`: a live run's are never taken for stale); a run's resume state,
``.NAME.bpdq-resume/`` (:mod:`bpdq.engine.resume`), is not one of them. The target is checked before any
work: not a file, empty unless ``overwrite``, its parent writable, and clear of the run's inputs. A target
that is a symbolic link is written through: the checkpoint replaces the directory the link points to.

:class:`CheckpointSink` streams: each finished decoder layer's tensors go to a :class:`~bpdq.shards.ShardWriter`
(a unit per layer; shards of at most ``max_shard_size``), then the unquantized rest, ``config.json``, the
tokenizer files and the run report. Memory held: at most one shard of finished tensors.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from abc import ABC, abstractmethod
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from bpdq.checkpoint import CONFIG_FILE, config_dict, unique_state_dict
from bpdq.engine.lock import lock_output
from bpdq.report import REPORT_FILE, RunReport
from bpdq.shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter, parse_size


def check_output_dir(
    target: str | Path, overwrite: bool, *, flag: str = "overwrite=True", inputs: Mapping[str, str | Path | None] | None = None,
) -> Path:
    """``target`` with its symbolic links resolved, after checking it can become a checkpoint directory (raises
    ``FileExistsError`` or ``ValueError`` naming it; ``flag`` is how the caller's user asks to overwrite):
    not a file, not a dangling or looping link, empty unless ``overwrite``, its parent writable, and neither
    equal to, inside nor a parent of any of ``inputs`` (what the run reads, by description: e.g. ``{"model
    directory": path}``). Creates its missing parent directories."""
    given = Path(target).expanduser()
    try:
        path = given.resolve()
    except (RuntimeError, OSError):
        raise ValueError(f"output {str(given)!r} is a symbolic link that loops") from None
    if given.is_symlink() and not path.exists():
        raise ValueError(f"output {str(given)!r} is a symbolic link to {str(path)!r}, which does not exist")
    for label, item in (inputs or {}).items():
        if item is None:
            continue
        source = Path(item).expanduser().resolve()
        relation = ("is" if source == path else "is inside" if source in path.parents
                    else "contains" if path in source.parents else None)
        if relation is not None:
            raise ValueError(f"output {str(given)!r} {relation} the {label} {str(item)!r}: a run never writes into "
                             "or replaces what it reads; choose another output")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output {str(given)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {str(given)!r} is not empty; pass {flag} to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=path.parent)).rmdir()
    except OSError as exc:
        raise ValueError(f"output directory {str(given)!r} cannot be written ({exc.strerror or exc})") from None
    return path


class OutputDir:
    """A checkpoint directory written atomically (temporary directory beside the target, then a rename), under
    the output's lock (:func:`~bpdq.engine.lock.lock_output`) from creation to commit or abort."""

    def __init__(
        self, target: str | Path, *, overwrite: bool = False, inputs: Mapping[str, str | Path | None] | None = None,
    ) -> None:
        self.target = check_output_dir(target, overwrite, inputs=inputs)
        self._lock = ExitStack()
        self._lock.enter_context(lock_output(self.target))
        try:
            for stale in self.target.parent.glob(f".{self.target.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        except BaseException:
            self._lock.close()
            raise

    def commit(self) -> Path:
        with self._lock:
            if self.target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-old-", dir=self.target.parent))
                self.target.rename(old / "previous")
                self.tmp.rename(self.target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                self.tmp.rename(self.target)
        return self.target

    def abort(self) -> None:
        with self._lock:
            shutil.rmtree(self.tmp, ignore_errors=True)


class Sink(ABC):
    """Receives each finished decoder layer, then the rest of the model."""

    @abstractmethod
    def write_layer(self, prefix: str, layer: nn.Module) -> None:
        """Store the finished layer ``prefix`` (its QuantLinear modules are in place)."""

    @abstractmethod
    def finish(self, model: nn.Module, rest: dict[str, torch.Tensor], report: RunReport | None) -> Path | None:
        """Store ``rest`` (every tensor outside the decoder layers) and complete the output."""

    @abstractmethod
    def abort(self) -> None:
        """Remove everything written so far (called on any exception)."""


class InMemorySink(Sink):
    """The results are the model's own modules, swapped by the run: nothing to write."""

    def write_layer(self, prefix: str, layer: nn.Module) -> None:
        return None

    def finish(self, model: nn.Module, rest: dict[str, torch.Tensor], report: RunReport | None) -> Path | None:
        return None

    def abort(self) -> None:
        return None


class CheckpointSink(Sink):
    """A bpdq checkpoint directory written layer by layer (see the module docstring)."""

    def __init__(
        self,
        output: str | Path,
        tokenizer: Any,
        *,
        overwrite: bool = False,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        extra_files: Callable[[RunReport | None], dict[str, str]] | None = None,
        inputs: Mapping[str, str | Path | None] | None = None,
    ) -> None:
        parse_size(max_shard_size)
        self.tokenizer = tokenizer
        self.extra_files = extra_files
        self.out = OutputDir(output, overwrite=overwrite, inputs=inputs)
        self.writer = ShardWriter(self.out.tmp, max_shard_size)

    def write_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.writer.add(tensors)

    def write_layer(self, prefix: str, layer: nn.Module) -> None:
        self.writer.add({f"{prefix}.{k}": v for k, v in unique_state_dict(layer).items()})

    def finish(self, model: nn.Module, rest: dict[str, torch.Tensor], report: RunReport | None) -> Path:
        tmp = self.out.tmp
        config = config_dict(model)
        self.writer.add(rest)
        files = self.writer.close()
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(tmp))
        if report is not None:
            report.checkpoint_bytes = sum(f.stat().st_size for f in files)
            report.write(tmp / REPORT_FILE)
        for name, text in (self.extra_files(report) if self.extra_files else {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        return self.out.commit()

    def abort(self) -> None:
        self.writer.abort()
        self.out.abort()
