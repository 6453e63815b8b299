"""Resume an interrupted run: the state a checkpoint run keeps beside its output, and a clean stop on signals.

A run with ``output`` and a resume mode keeps its state in ``.NAME.bpdq-resume/`` beside the output ``NAME``
(a hidden directory of its own: the stale-temporary-directory clean-up of :class:`~bpdq.engine.sink.OutputDir`
never touches it). After each finished decoder layer it holds:

- ``layer-00000.safetensors`` ...: each finished layer's tensors, exactly as written to the checkpoint;
- ``inputs-0000N/``: the next layer's inputs (``hidden-*.safetensors``, one file per calibration batch, and
  ``fp-*.safetensors`` for the full-precision stream); absent in a data-free run;
- ``manifest.json``: the format version, the run's *fingerprint*, the number of finished layers, each
  finished layer's QuantLinear table and module records, and the stages' states (tuning results, the
  bit allocation and its rules).

Every file is written under a temporary name and renamed; the manifest is replaced last, so a process killed
at any point (SIGKILL included) leaves the previous consistent state and loses at most the layer in flight.
Nothing in the state is a pickle: tensors are safetensors, the rest JSON. The keyword arguments of the
layers (masks, position embeddings) are not stored: a resumed run recomputes them from the calibration
windows, as it does for the first layer.

The fingerprint names what determines the result: the model (its weight files' names and sizes and the
hash of ``config.json`` for a model directory; the hash of the config and every tensor for a model in
memory), the dtype, the hash of the calibration token ids, the recipe and rules, the stages, the batch size,
the device type, the bpdq and torch versions and the world size. On resume any difference fails closed with
a ``ValueError`` naming each differing field. Modes: ``auto`` continues from the state when there is one and
starts over otherwise; ``required`` refuses to start without one; ``never`` removes an old state and starts
over. In every mode the run keeps a new state as it goes, and removes it once the checkpoint is complete.

:func:`~bpdq.engine.interrupt.stop_at_layer_boundary` turns SIGINT and SIGTERM into a request that the loop
honours after the layer in work is written and its state saved; a second signal interrupts at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from bpdq.engine import distributed
from bpdq.engine.source import LazySource
from bpdq.batch import Batch
from bpdq.checkpoint import CONFIG_FILE, unique_state_dict

logger = logging.getLogger(__name__)

RESUME_MODES = ("auto", "never", "required")
STATE_FORMAT = 2
MANIFEST_FILE = "manifest.json"


def state_dir(output: str | Path) -> Path:
    """Where the run writing ``output`` keeps its resume state."""
    path = Path(output).expanduser()
    return path.parent / f".{path.name}.bpdq-resume"


def _sha256(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def windows_hash(windows: Sequence[torch.Tensor] | None) -> str | None:
    """The hash of the calibration token ids (window lengths included)."""
    if windows is None:
        return None
    h = hashlib.sha256()
    for w in windows:
        h.update(str(w.numel()).encode())
        h.update(_raw_bytes(w.to(torch.int64)))
    return h.hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``field: saved -> current`` for each field that differs (nested fields dotted)."""
    a, b = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {_short(a.get(key, '<absent>'))} -> {_short(b.get(key, '<absent>'))}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else f"{text[:77]}..."


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f"{path.name}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def source_fingerprint(source: Any) -> dict[str, Any]:
    """What identifies the model a run reads: a directory's weight files (names, sizes) and config hash, or
    the config and every tensor of a model in memory (hashed: about a second per GB)."""
    if isinstance(source, LazySource):
        return {
            "files": {p.name: p.stat().st_size for p in source.files.files},
            "config_sha256": _sha256((source.directory / CONFIG_FILE).read_bytes()),
            "dtype": str(source.dtype),
        }
    model = source.model
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    h = hashlib.sha256()
    for name, t in sorted(unique_state_dict(model).items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if not t.is_meta:  # a source of another kind may not have materialised it: its shape is all there is
            h.update(_raw_bytes(t))
    return {"config_sha256": _sha256(json.dumps(config, sort_keys=True, default=str).encode()), "tensors_sha256": h.hexdigest()}


def check_resume_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`RESUME_MODES`, else ``ValueError`` naming them."""
    if mode not in RESUME_MODES:
        raise ValueError(f"resume must be one of {', '.join(RESUME_MODES)}; got {mode!r}")
    return mode


def read_state(output: str | Path, mode: str) -> dict[str, Any] | None:
    """The manifest of the resume state beside ``output`` (``None`` when there is none), after checking
    ``mode``; ``required`` with no state, or an unreadable manifest, raises ``ValueError``. Changes nothing."""
    check_resume_mode(mode)
    directory = state_dir(output)
    manifest_path = directory / MANIFEST_FILE
    manifest = None
    if mode != "never" and manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"resume state {manifest_path} is unreadable ({exc}); pass resume='never' to start over") from None
    if mode == "required" and manifest is None:
        raise ValueError(f"resume='required' but there is no resume state at {directory} (no finished layer was saved)")
    return manifest


_SHARED = "in a distributed run it must be on a filesystem all ranks share, at the same path"


class ResumeState:
    """The resume state of one run writing ``output`` (see the module docstring). ``mode`` is one of
    :data:`RESUME_MODES`; ``required`` with no state raises ``ValueError`` here, before any work."""

    def __init__(self, output: str | Path, mode: str) -> None:
        self.mode = mode
        self.dir = state_dir(output)
        self.manifest: dict[str, Any] | None = None
        read_state(output, mode)  # the mode and the state's readability, before anything is removed
        if mode == "never" and self.dir.exists() and distributed.rank() == 0:
            logger.info("resume=never: removing the old resume state %s", self.dir)
            shutil.rmtree(self.dir)
        distributed.barrier()
        self.manifest = read_state(output, mode)

    def check(self, fingerprint: dict[str, Any]) -> int:
        """The number of finished layers to resume after (0 without a state); ``ValueError`` naming each
        difference if the saved state was made by another run. Starts a new state when there is none."""
        fingerprint = json.loads(json.dumps(fingerprint))  # the JSON form, as it is saved
        self._check_shared()
        if self.manifest is not None:
            if self.manifest.get("format") != STATE_FORMAT:
                raise ValueError(f"resume state {self.dir} has format {self.manifest.get('format')!r}, this bpdq "
                                 f"writes {STATE_FORMAT}; pass resume='never' to start over")
            diff = fingerprint_differences(self.manifest["fingerprint"], fingerprint)
            if diff:
                raise ValueError(f"the resume state in {self.dir} was made by a different run ("
                                 + "; ".join(diff) + "); pass resume='never' (--resume never) to start over")
            if distributed.rank() == 0:
                self._clean(int(self.manifest["layers_done"]))
            distributed.barrier()
            logger.info("resuming after %d finished decoder layers from %s", self.manifest["layers_done"], self.dir)
            return int(self.manifest["layers_done"])
        if distributed.rank() == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
        distributed.barrier()
        distributed.check_same(f"{self.dir.is_dir()}", f"whether the new resume state directory exists ({_SHARED})")
        self.manifest = {"format": STATE_FORMAT, "fingerprint": fingerprint, "layers_done": 0, "layers": {},
                         "records": [], "stages": {}}
        return 0

    def _check_shared(self) -> None:
        """Rank 0 decides whether to resume and from what (its state's finished layers and manifest hash); a
        rank that sees another state (node-local disks: another directory's, or none) fails every rank, before
        the Hessians of different layers could be summed."""
        if self.manifest is None:
            seen = "no resume state"
        else:
            digest = hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()[:16]
            seen = f"a resume state with {self.manifest.get('layers_done')} finished layers (manifest sha256 {digest}...)"
        distributed.check_same(seen, f"the resume state ({_SHARED})")

    def _clean(self, done: int) -> None:
        """Remove what a killed process left beyond the manifest (temporary files, a newer layer or inputs)."""
        keep = {MANIFEST_FILE, *(f"layer-{i:05d}.safetensors" for i in range(done)), f"inputs-{done:05d}"}
        for path in self.dir.iterdir():
            if path.name in keep:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    # ---- reading -------------------------------------------------------------------------------------

    @property
    def layers_done(self) -> int:
        return int(self.manifest["layers_done"]) if self.manifest else 0

    @property
    def stage_states(self) -> dict[str, Any]:
        """Each stage's saved :meth:`~bpdq.engine.stages.Stage.state` (by name)."""
        assert self.manifest is not None
        return self.manifest["stages"]

    def records(self) -> list[dict[str, Any]]:
        assert self.manifest is not None
        return list(self.manifest["records"])

    def layer(self, index: int) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
        """Finished layer ``index``: its QuantLinear table (relative names) and tensors (relative names)."""
        from safetensors.torch import load_file

        assert self.manifest is not None
        return self.manifest["layers"][str(index)], load_file(str(self.dir / f"layer-{index:05d}.safetensors"))

    def inputs(self, batches: Sequence[Batch], stream: str, first: int = 0, out: Any = None) -> Any:
        """``batches`` (layer-0 inputs: their keyword arguments) with the saved hidden states of ``stream``
        (``hidden`` or ``fp``) for the next layer to run, appended one by one to ``out`` (an
        :class:`~bpdq.engine.activations.ActivationStore` or a list; by default a new list); ``first`` is the
        global number of ``batches[0]`` (a rank's share of a distributed run)."""
        from safetensors.torch import load_file

        folder = self.dir / f"inputs-{self.layers_done:05d}"
        out = [] if out is None else out
        for j, b in enumerate(batches):
            path = folder / f"{stream}-{first + j:05d}.safetensors"
            if not path.is_file():
                raise ValueError(f"resume state {self.dir} lacks {path.relative_to(self.dir)}; pass resume='never' to start over")
            hidden = load_file(str(path))["hidden"]
            if hidden.shape != b.hidden.shape or hidden.dtype != b.hidden.dtype:
                raise ValueError(f"resume state {path} holds {tuple(hidden.shape)} {hidden.dtype}, the run's batch is "
                                 f"{tuple(b.hidden.shape)} {b.hidden.dtype}; pass resume='never' to start over")
            out.append(Batch(hidden, b.args, b.kwargs))
        return out

    # ---- writing -------------------------------------------------------------------------------------

    def set_stage_states(self, states: dict[str, Any]) -> None:
        """Save the stages' states now (e.g. a pre-pass's result, before the first layer is done)."""
        assert self.manifest is not None
        self.manifest["stages"].update(states)
        if distributed.rank() == 0:
            _write_json(self.dir / MANIFEST_FILE, self.manifest)

    def save_layer(
        self, index: int, table: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor], records: list[dict[str, Any]],
        streams: dict[str, Sequence[Batch] | None], stages: dict[str, Any], first: int = 0,
    ) -> None:
        """Layer ``index`` is written: save its tensors, the next layer's inputs (each rank its share,
        ``first`` being the global number of its first batch), then the manifest (rank 0)."""
        assert self.manifest is not None and index == self.layers_done
        lead = distributed.rank() == 0
        if lead:
            _save_tensors(self.dir / f"layer-{index:05d}.safetensors", tensors)
        folder = self.dir / f"inputs-{index + 1:05d}"
        tmp = folder.with_name(f"{folder.name}.tmp")
        saving = any(s is not None for s in streams.values())
        if saving:
            if lead:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            distributed.barrier()
            for name, stream in streams.items():
                for j, b in enumerate(stream or ()):
                    _save_tensors(tmp / f"{name}-{first + j:05d}.safetensors", {"hidden": b.hidden})
            distributed.barrier()
        self.manifest["layers"][str(index)] = table
        self.manifest["records"] = self.manifest["records"] + records
        self.manifest["stages"].update(stages)
        self.manifest["layers_done"] = index + 1
        if lead:
            if saving:
                os.replace(tmp, folder)
            _write_json(self.dir / MANIFEST_FILE, self.manifest)
            shutil.rmtree(self.dir / f"inputs-{index:05d}", ignore_errors=True)

    def remove(self) -> None:
        """The checkpoint is complete: the state is no longer needed."""
        if distributed.rank() == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
