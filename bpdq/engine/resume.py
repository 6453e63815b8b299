"""Resume an interrupted run: the state a checkpoint run keeps beside its output, and a clean stop on signals.

A run with ``output`` and a resume mode keeps its state in ``.NAME.bpdq-resume/`` beside the output ``NAME``
(a hidden directory of its own: the stale-temporary-directory clean-up of :class:`~bpdq.engine.sink.OutputDir`
never touches it). After each finished decoder layer it holds:

- ``layer-00000.safetensors`` ...: each finished layer's tensors, exactly as written to the checkpoint;
- ``inputs-0000N/``: the next layer's inputs (``hidden-*.safetensors``, one file per calibration batch, and
  ``fp-*.safetensors`` for the full-precision stream); absent in a data-free run;
- ``manifest.json``: the format version, the run's *fingerprint*, the number of finished layers, each
  finished layer's QuantLinear table and module records, the stages' states (tuning results, the
  bit allocation and its rules), and the size and sha256 of every file above.

Every file is written under a temporary name and renamed; the manifest is replaced last, so a process killed
at any point (SIGKILL included) leaves the previous consistent state and loses at most the layer in flight.
The state directory is made when the first thing is saved (a run failing in its first layer leaves none).
On resume every file is checked against its size and sha256 before any work (one read of the state), and
the manifest's fields against the run; a damaged state is refused (:class:`ResumeRefused`) naming the file.
Nothing in the state is a pickle: tensors are safetensors, the rest JSON. The keyword arguments of the
layers (masks, position embeddings) are not stored: a resumed run recomputes them from the calibration
windows, as it does for the first layer.

The fingerprint names what determines the result: the model (its weight files' names, sizes and header
hashes and the hash of ``config.json`` for a model directory; the hash of the config and every tensor for a
model in memory), the dtype, the calibration (the hash of its token ids, its sample count, length and seed),
the recipe and rules, the stages, the batch size, the device type and what ``autocast: auto`` resolves to
there, the bpdq, torch and transformers versions and the world size. On resume any difference fails closed
with a :class:`ResumeRefused` naming each differing field. Modes: ``auto`` continues from the state when
there is one and starts over otherwise; ``required`` refuses to start without one; ``never`` removes an old
state and starts over. In every mode the run keeps a new state as it goes, and removes it once the
checkpoint is complete. A state whose every layer is done (a run stopped or killed after its last layer,
or while writing the checkpoint) resumes to the final write alone.

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
STATE_FORMAT = 3
MANIFEST_FILE = "manifest.json"
_CHUNK = 1 << 24


class ResumeRefused(ValueError):
    """The resume state cannot be used (made by another run, damaged, missing); ``problem`` says why, the
    message adds how to start over from Python (a command line says ``--resume never``)."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}; pass resume='never' to start over")
        self.problem = problem


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


def file_digest(path: Path) -> dict[str, Any]:
    """``{"size", "sha256"}`` of the file ``path`` (read in chunks)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _writing(path: Path, tmp: Path, write: Any) -> None:
    """``write(tmp)``, then ``tmp`` renamed to ``path``; a failure (a full disk...) removes ``tmp`` and raises
    an ``OSError`` naming ``path``."""
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception):
            raise OSError(getattr(exc, "errno", None), f"cannot save the resume state file {path} ({exc})") from exc
        raise


def _write_json(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    _writing(path, path.with_name(f"{path.name}.tmp"), write)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _writing(path, path.with_name(f"{path.name}.tmp"), lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' own error type names no file
        raise ResumeRefused(f"resume state file {path} cannot be read ({exc})") from None


def source_fingerprint(source: Any) -> dict[str, Any]:
    """What identifies the model a run reads: a directory's weight files (names, sizes) and config hash, or
    the config and every tensor of a model in memory (hashed: about a second per GB)."""
    if isinstance(source, LazySource):
        return {
            "files": {p.name: {"size": p.stat().st_size, "header_sha256": _header_sha256(p)} for p in source.files.files},
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


def _header_sha256(path: Path) -> str:
    """The hash of a safetensors file's header (names, dtypes, shapes, offsets and metadata; not the data)."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        return _sha256(head, f.read(min(n, 100_000_000)))


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
        except (OSError, ValueError) as exc:
            raise ResumeRefused(f"resume state {manifest_path} is unreadable ({exc})") from None
        if not isinstance(manifest, dict):
            raise ResumeRefused(f"resume state {manifest_path} is not a manifest (a JSON object)")
    if mode == "required" and manifest is None:
        raise ValueError(f"resume='required' but there is no resume state at {directory} (no finished layer was saved)")
    return manifest


_MANIFEST_FIELDS = {"format": int, "fingerprint": dict, "layers_done": int, "layers": dict, "records": list,
                    "stages": dict, "files": dict}


def check_manifest(manifest: dict[str, Any], directory: Path, n_layers: int) -> None:
    """``ResumeRefused`` naming the first field of ``manifest`` that a run of ``n_layers`` decoder layers
    cannot resume from (after the format, checked first)."""
    where = directory / MANIFEST_FILE
    if manifest.get("format") != STATE_FORMAT:
        raise ResumeRefused(f"resume state {directory} has format {_short(json.dumps(manifest.get('format')))}, this bpdq "
                            f"writes {STATE_FORMAT}")
    for name, kind in _MANIFEST_FIELDS.items():
        value = manifest.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ResumeRefused(f"resume state {where}: {name} is {_short(json.dumps(value))}, not a JSON {kind.__name__}")
    done = manifest["layers_done"]
    if not 0 <= done <= n_layers:
        raise ResumeRefused(f"resume state {where}: layers_done is {done}; the model has {n_layers} decoder layers")
    for i in range(done):
        if str(i) not in manifest["layers"] or f"layer-{i:05d}.safetensors" not in manifest["files"]:
            raise ResumeRefused(f"resume state {where} lacks finished layer {i} (layers_done is {done})")
    for name, entry in manifest["files"].items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("size"), int)
                or not isinstance(entry.get("sha256"), str) or Path(name).is_absolute() or ".." in Path(name).parts):
            raise ResumeRefused(f"resume state {where}: the entry of file {name!r} is malformed")


def verify_files(manifest: dict[str, Any], directory: Path) -> None:
    """``ResumeRefused`` naming the first file of the state that is missing or whose size or sha256 differs
    from what ``manifest`` recorded when it was written."""
    for name, want in sorted(manifest["files"].items()):
        path = directory / name
        if not path.is_file():
            raise ResumeRefused(f"resume state file {path} is missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise ResumeRefused(f"resume state file {path} has {size} bytes, {want['size']} were written")
        if file_digest(path)["sha256"] != want["sha256"]:
            raise ResumeRefused(f"resume state file {path} is damaged (its sha256 differs from the one recorded)")


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

    def check(self, fingerprint: dict[str, Any], n_layers: int) -> int:
        """The number of finished layers to resume after (0 without a state); :class:`ResumeRefused` naming
        each difference if the saved state was made by another run, or naming the file or field that is
        damaged (every file is checked against its recorded size and sha256). Starts a new state when there
        is none."""
        fingerprint = json.loads(json.dumps(fingerprint))  # the JSON form, as it is saved
        self._check_shared()
        if self.manifest is not None:
            check_manifest(self.manifest, self.dir, n_layers)
            diff = fingerprint_differences(self.manifest["fingerprint"], fingerprint)
            if diff:
                raise ResumeRefused(f"the resume state in {self.dir} was made by a different run (" + "; ".join(diff) + ")")
            done = self.manifest["layers_done"]
            if distributed.rank() == 0:
                self._clean(done)
                verify_files(self.manifest, self.dir)
            distributed.barrier()
            logger.info("resuming after %d finished decoder layers from %s", done, self.dir)
            return done
        if distributed.rank() == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
        distributed.barrier()
        self.manifest = {"format": STATE_FORMAT, "fingerprint": fingerprint, "layers_done": 0, "layers": {},
                         "records": [], "stages": {}, "files": {}}
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
        assert self.manifest is not None
        keep = {MANIFEST_FILE, *(name.split("/")[0] for name in self.manifest["files"])}
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
        assert self.manifest is not None
        return self.manifest["layers"][str(index)], _load_tensors(self.dir / f"layer-{index:05d}.safetensors")

    def inputs(self, batches: Sequence[Batch], stream: str, first: int = 0, out: Any = None) -> Any:
        """``batches`` (layer-0 inputs: their keyword arguments) with the saved hidden states of ``stream``
        (``hidden`` or ``fp``) for the next layer to run, appended one by one to ``out`` (an
        :class:`~bpdq.engine.activations.ActivationStore` or a list; by default a new list); ``first`` is the
        global number of ``batches[0]`` (a rank's share of a distributed run)."""
        assert self.manifest is not None
        folder = f"inputs-{self.layers_done:05d}"
        out = [] if out is None else out
        for j, b in enumerate(batches):
            name = f"{folder}/{stream}-{first + j:05d}.safetensors"
            path = self.dir / name
            if name not in self.manifest["files"] or not path.is_file():
                raise ResumeRefused(f"resume state {self.dir} lacks {name}")
            hidden = _load_tensors(path).get("hidden")
            if hidden is None or hidden.shape != b.hidden.shape or hidden.dtype != b.hidden.dtype:
                found = "no 'hidden' tensor" if hidden is None else f"{tuple(hidden.shape)} {hidden.dtype}"
                raise ResumeRefused(f"resume state file {path} holds {found}, the run's batch is "
                                    f"{tuple(b.hidden.shape)} {b.hidden.dtype}")
            out.append(Batch(hidden, b.args, b.kwargs))
        return out

    # ---- writing -------------------------------------------------------------------------------------

    def _record(self, name: str) -> None:
        assert self.manifest is not None
        self.manifest["files"][name] = file_digest(self.dir / name)

    def set_stage_states(self, states: dict[str, Any]) -> None:
        """Save the stages' states now (e.g. a pre-pass's result, before the first layer is done); nothing is
        written while there is nothing to keep."""
        assert self.manifest is not None
        self.manifest["stages"].update(states)
        if distributed.rank() == 0 and (self.dir.is_dir() or any(v is not None for v in states.values())):
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.dir / MANIFEST_FILE, self.manifest)

    def save_layer(
        self, index: int, table: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor], records: list[dict[str, Any]],
        streams: dict[str, Sequence[Batch] | None], stages: dict[str, Any], first: int = 0,
    ) -> None:
        """Layer ``index`` is written: save its tensors, the next layer's inputs (each rank its share,
        ``first`` being the global number of its first batch), then the manifest (rank 0)."""
        assert self.manifest is not None and index == self.layers_done
        lead = distributed.rank() == 0
        files = self.manifest["files"]
        if lead:
            self.dir.mkdir(parents=True, exist_ok=True)
            _save_tensors(self.dir / f"layer-{index:05d}.safetensors", tensors)
            self._record(f"layer-{index:05d}.safetensors")
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
        for name in [n for n in files if n.startswith(f"inputs-{index:05d}/")]:
            del files[name]
        if lead and saving:  # every rank's files, as they are on the shared storage
            for path in sorted(tmp.iterdir()):
                files[f"{folder.name}/{path.name}"] = file_digest(path)
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
