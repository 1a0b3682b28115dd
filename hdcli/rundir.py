"""The run directory: the one place that names its files, and the atomic writes every file of ``hd`` goes through.

A run dir (``hd distill/finetune/pretrain --out DIR``; DESIGN.md "Formats")::

    DIR/config.toml         the resolved config (CONFIG)
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
