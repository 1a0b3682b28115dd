"""The run directory: the one place that names its files, and the atomic writes every file of ``hd`` goes through.

A run dir (``hd distill/finetune/pretrain --out DIR``; DESIGN.md "Formats")::

    DIR/config.toml         the resolved config (CONFIG)
    DIR/config-history/     earlier segments' configs (--allow-config-change) (CONFIG_HISTORY)
    DIR/metrics.jsonl       one JSON object per logged step (METRICS)
    DIR/results.json        hd finetune: top-1/top-5 per epoch (RESULTS)
    DIR/checkpoints/step_*  Accelerate state + state.json (CHECKPOINTS, STATE)
    DIR/student/            the export: timm save_for_hf layout (STUDENT)
    DIR/tensorboard/        optional tracker logs (TENSORBOARD)

Every file is written under a temporary name in the same directory and renamed into place
(``os.replace`` is atomic on POSIX), so a crash or a full disk never leaves a half-written file
under its final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CONFIG = "config.toml"
CONFIG_HISTORY = "config-history"  # config of each earlier segment of a run resumed with --allow-config-change
METRICS = "metrics.jsonl"
RESULTS = "results.json"
CHECKPOINTS = "checkpoints"
STATE = "state.json"
STUDENT = "student"
TENSORBOARD = "tensorboard"


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside ``path`` (same filesystem) to write to; renamed over ``path`` when the block
    succeeds, removed when it fails (a full disk), so ``path`` is either the old file or the whole new one.
    Parent dirs are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically (:func:`replacing`)."""
    with replacing(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
    return Path(path)


def reason(e: BaseException) -> str:
    """One line saying why a write failed: OSError's text, or the first line of a library's error (a full
    disk reaches safetensors as SafetensorError and torch.save as RuntimeError, not as OSError)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text[:300]


def write_json(path: str | os.PathLike, obj, *, indent: int = 1) -> Path:
    """``obj`` as indented JSON (one trailing newline), written atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: str | os.PathLike) -> dict | None:
    """A JSON object from ``path``; None when the file is missing, unreadable or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


LOCK = ".lock"


class RunLock:
    """An exclusive lock on a run dir, held by one launch for the whole run (``fcntl.flock`` on ``DIR/.lock``).

    Only the main process of a launch takes it (its other ranks belong to the same run). The kernel drops
    the lock when its process dies, so a lock file left by a killed run is free: it is taken over, and
    the holder it names is reported. A second run on the same dir gets a one-line error naming the holder.
    """

    def __init__(self, run_dir: str | os.PathLike, what: str = "hd"):
        self.path = Path(run_dir) / LOCK
        self.what = what
        self._fd: int | None = None
        self.took_over: str | None = None  # the holder named in a stale lock file, if one was taken over
        self.unsupported: str | None = None  # why the file system cannot lock (the run goes on unlocked)

    def acquire(self) -> RunLock:
        import errno
        import fcntl
        import socket
        import sys
        import time

        from hdcli.errors import HDError

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise HDError(f"{self.path.parent} is in use by another run ({holder or 'holder unknown'})",
                              "wait for it to finish, stop it, or choose another --out") from None
            self.unsupported = e.strerror or str(e)  # e.g. Lustre without -o flock: ENOSYS/ENOLCK
            return self
        try:
            self.took_over = _read_holder(fd) or None
            os.ftruncate(fd, 0)
            os.write(fd, (f"pid {os.getpid()} on {socket.gethostname()} since "
                          f"{time.strftime('%Y-%m-%dT%H:%M:%S')}: {self.what} {' '.join(sys.argv[1:])}\n").encode())
        except BaseException:
            os.close(fd)  # the lock goes with it
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096).decode(errors="replace").strip()
    except OSError:
        return ""
