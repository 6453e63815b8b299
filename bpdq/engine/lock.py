"""One run per output: an exclusive ``fcntl.flock`` lock held for the whole run, and spill directories that a
later run can tell from a live one.

:func:`lock_output` locks ``.NAME.bpdq-lock`` beside the output ``NAME`` (the file holds the holder's process
id). A second process asking for the same output fails at once with a ``ValueError`` naming that process; the
same process may take the lock again (the CLI holds it around :func:`bpdq.quantize`, which takes it too). The
kernel releases the lock when its holder exits, SIGKILL included; the file is removed by a holder that exits
normally. In a distributed run only rank 0 locks (the other ranks write nothing outside the state directory
before rank 0 has the lock, and learn of its failure at their next status exchange).

:func:`locked_tempdir` makes a temporary directory holding a locked file: a process killed with SIGKILL leaves
it unlocked, so the next one (:func:`sweep_stale`) removes it, while a live run's is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

LOCK_SUFFIX = ".bpdq-lock"
_DIR_LOCK = ".lock"
_held: dict[str, tuple[int, int]] = {}  # lock path -> (file descriptor, depth): this process's locks


def lock_path(output: str | Path) -> Path:
    """The lock file of the run writing ``output``."""
    path = Path(output).expanduser()
    return path.parent / f".{path.name}{LOCK_SUFFIX}"


def _try_lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock, or ``None`` if another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its holder removed the file as we locked it: lock the new one


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="utf-8").strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


@contextlib.contextmanager
def lock_output(output: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of ``output`` (see the module docstring); yields the lock file's path."""
    path = lock_path(output)
    key = str(path.resolve())
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
    else:
        fd = _try_lock(path)
        if fd is None:
            raise ValueError(f"output {str(Path(output).expanduser())!r} is in use by {_holder(path)} (it holds "
                             f"{path}); wait for that run to end or choose another output")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = (fd, 1)
    try:
        yield path
    finally:
        fd, depth = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1)
        else:
            del _held[key]
            with contextlib.suppress(OSError):
                path.unlink()  # still locked: a process that opened it meanwhile sees another inode and retries
            os.close(fd)


def sweep_stale(parent: Path, prefix: str) -> None:
    """Remove the directories ``parent/prefix*`` made by :func:`locked_tempdir` whose process is gone."""
    for path in parent.glob(f"{prefix}*"):
        lock = path / _DIR_LOCK
        if not path.is_dir() or path.is_symlink() or not lock.is_file():
            continue
        try:
            fd = _try_lock(lock)
        except OSError:  # removed by its run as we looked
            continue
        if fd is not None:
            try:
                shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)


@contextlib.contextmanager
def locked_tempdir(prefix: str, parent: str | Path | None = None) -> Iterator[Path]:
    """A new directory ``parent/prefix*`` (the system's temporary directory by default), removed on exit, with
    a lock held inside it while it exists; stale ones of the same prefix are removed first."""
    base = Path(parent if parent is not None else tempfile.gettempdir())
    sweep_stale(base, prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    fd = _try_lock(path / _DIR_LOCK)
    assert fd is not None  # a new directory: nobody else knows it
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
