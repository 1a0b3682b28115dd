"""Checkpoints and the loop's other file I/O: atomic ``step_*`` dirs, finding and loading them, the export,
the metrics log, the free-space check and one-line reasons for failed writes.

A checkpoint ``<run>/checkpoints/step_XXXXXXX`` (``accelerator.save_state`` + ``state.json``) is written under
a temporary name and renamed, so a directory named ``step_*`` is always complete; the last
``keep_checkpoints`` are kept. Only the trainable module's weights are saved (frozen teachers are rebuilt
from their source, never copied into checkpoints).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import nn

from hdcli import ui
from hdcli.errors import HDError
from hdcli.rundir import CHECKPOINTS, METRICS, STATE, atomic_write, reason, write_json

PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run (``step_*`` dirs holding state.json), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(PREFIX) and d.name[len(PREFIX):].isdigit() and (d / STATE).is_file():
            found.append((int(d.name[len(PREFIX):]), d))
    return [d for _, d in sorted(found)]


def find_checkpoint(resume: str | os.PathLike | None, run_dir: str | os.PathLike) -> Path | None:
    """``auto``: the newest complete checkpoint of ``run_dir`` (None if there is none); a path: that
    checkpoint, or the newest one of the run dir / checkpoints dir it names."""
    if resume is None:
        return None
    if str(resume) == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if (path / STATE).is_file():
        return path
    for run in (path, path.parent):
        found = list_checkpoints(run)
        if found and (path == run or path.name == CHECKPOINTS):
            return found[-1]
    raise HDError(f"no complete checkpoint at {path}",
                  "give a checkpoints/step_* dir, a run dir, or --resume auto")


def damage(ckpt: Path) -> str | None:
    """Why checkpoint ``ckpt`` cannot be loaded (a file missing, cut or corrupt), or None when it is intact.

    Reads every file once: the safetensors header (safetensors checks the file's size against it) and the
    CRC of every member of the torch.save (zip) files (optimizer, RNG states), so a truncated or
    overwritten file is found here rather than reported later as a checkpoint that "does not fit this run"."""
    import zipfile

    from safetensors import safe_open

    weights = ckpt / "model.safetensors"  # what accelerator.save_state writes
    if not weights.is_file():
        return "model.safetensors is missing"
    try:
        with safe_open(str(weights), "pt"):
            pass  # safetensors checks the header and that the file covers every tensor's bytes, exactly
    except Exception as e:  # SafetensorError: cut, padded or not a safetensors file
        return f"model.safetensors: {reason(e)}"
    for f in sorted(ckpt.iterdir()):
        if f.suffix not in (".bin", ".pkl", ".pt"):
            continue
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
            if bad is not None:
                return f"{f.name}: member {bad} is corrupt"
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f"{f.name}: {reason(e)}"
    return None


def intact(ckpt: Path, run_dir: Path, *, newest: bool) -> Path:
    """``ckpt``, or with ``newest`` (``--resume auto``) the newest intact checkpoint at or before it, each
    damaged one named in a warning; HDError when none is intact."""
    candidates = [c for c in list_checkpoints(run_dir) if c.name <= ckpt.name][::-1] if newest else [ckpt]
    damaged = []
    for c in candidates or [ckpt]:
        why = damage(c)
        if why is None:
            if ui.is_main_process():
                for d, w in damaged:
                    ui.warn(f"checkpoint {d.name} is damaged ({w}); resuming from {c.name}")
            return c
        if not newest:
            raise HDError(f"checkpoint {c} is damaged ({why})",
                          "resume from another checkpoint, or use --resume auto to take the newest intact one")
        damaged.append((c, why))
    first, why = damaged[0]
    more = f" (and {len(damaged) - 1} older ones)" if len(damaged) > 1 else ""
    raise HDError(f"checkpoint {first} is damaged ({why}){more}, and no older checkpoint of the run is intact",
                  "start a new --out, or delete the damaged checkpoints to start afresh")


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / STATE).read_text())
    except (OSError, ValueError) as e:
        raise HDError(f"checkpoint {ckpt} is unreadable ({e})", "resume from an older one or start afresh") from None


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def fault_injected(name: str) -> str | None:
    """For tests only: ``HD_FAULT_INJECT="free_bytes=1000"`` (comma-separated NAME=VALUE) makes the engine
    behave as if that fault were real. ``free_bytes``: the free space the disk check sees."""
    for item in os.environ.get("HD_FAULT_INJECT", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == name:
            return value.strip()
    return None


def check_free_space(path: Path, need: int) -> None:
    """HDError when ``path``'s filesystem has less than ``need`` bytes free (checked before the first save)."""
    free = shutil.disk_usage(path).free
    if (fake := fault_injected("free_bytes")) is not None:
        free = min(free, int(fake))
    if free < need:
        raise HDError(f"only {fmt_bytes(free)} free under {path}; checkpoints and the export need about "
                      f"{fmt_bytes(need)}", "free some space, lower --keep-checkpoints, or choose another --out")


def unwritable(run_dir: Path, e: OSError) -> HDError:
    return HDError(f"cannot write to the run dir {run_dir}: {e.strerror or e}",
                   "check its permissions and free space, or choose another --out")


def rmtree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def load_trainable(model: nn.Module, frozen_names: set[str], ckpt: Path) -> None:
    """Load the trainable weights of a checkpoint; HDError listing missing/unexpected keys on a mismatch."""
    from safetensors.torch import load_file

    path = ckpt / "model.safetensors"  # what accelerator.save_state writes
    if not path.is_file():
        raise HDError(f"checkpoint {ckpt} has no model.safetensors", "it is incomplete or not an hd checkpoint")
    try:
        sd = load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError: a file cut or changed after the checkpoint was written
        raise HDError(f"checkpoint {ckpt} is unreadable ({reason(e)})", "resume from an older one or start afresh") from None
    own = model.state_dict()
    expected = {k for k in own if k not in frozen_names}
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    shape = sorted(k for k in expected & sd.keys() if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shape:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)):
            if keys:
                parts.append(f"{what}: {', '.join(keys[:6])}" + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else ""))
        raise HDError(f"checkpoint {ckpt} was written for another model ({'; '.join(parts)})",
                      "resume with the run's own config, or start a new --out")
    model.load_state_dict(sd, strict=False)


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """accelerator.save_state into a temp dir, then rename: a ``step_*`` dir is always complete."""
    root = run_dir / CHECKPOINTS
    final, tmp = root / checkpoint_name(step), root / f".tmp-{checkpoint_name(step)}"
    main = accelerator.is_main_process
    accelerator.wait_for_everyone()
    try:
        if main:
            rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            write_json(tmp / STATE, state)
            if final.exists():  # the same step saved before (e.g. stopped right after a periodic save)
                rmtree(final)
            os.replace(tmp, final)
    except Exception as e:  # OSError, SafetensorError, RuntimeError: a failed save is an error, never skipped
        if main:
            rmtree(tmp)
        raise HDError(f"could not write checkpoint {final}: {reason(e)}",
                      "check free space and permissions of the run dir; earlier checkpoints are intact") from None
    if main:
        for old in list_checkpoints(run_dir)[:-keep]:
            rmtree(old)
    accelerator.wait_for_everyone()
    return final


def export(write, accelerator, final: Path) -> Path:
    """``write(tmp)`` into ``<final>.tmp``'s sibling ``.tmp-<name>``, then renamed over ``final``: the export dir
    is always complete; a failed export is an error and leaves the checkpoints as they were."""
    tmp, old = final.with_name(f".tmp-{final.name}"), final.with_name(f".old-{final.name}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        rmtree(tmp)
        try:
            tmp.mkdir(parents=True)
            write(tmp)
            if final.exists():
                rmtree(old)
                os.replace(final, old)
            os.replace(tmp, final)
        except BaseException as e:  # rolled back: the previous export (if any) is where it was, no temp dir
            rmtree(tmp)
            if old.exists() and not final.exists():
                os.replace(old, final)
            if isinstance(e, HDError | KeyboardInterrupt) or not isinstance(e, Exception):
                raise
            # OSError, SafetensorError, RuntimeError (a full disk): an error, never skipped
            raise HDError(f"could not write {final}: {reason(e)}",
                          "check free space and permissions; the checkpoints are intact") from None
        rmtree(old)
    accelerator.wait_for_everyone()
    return final


def trim_metrics(run_dir: Path, step: int) -> None:
    """On resume drop the records of ``<run>/metrics.jsonl`` written after the checkpoint (they are trained
    again); a fresh start (step 0) removes the file."""
    path = run_dir / METRICS
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue  # a line cut by a crash
    atomic_write(path, "".join(line + "\n" for line in keep))


def append_metrics(run_dir: Path, rec: dict) -> None:
    """One record appended to ``<run>/metrics.jsonl``; a failed write (a full disk mid-run) is an error, never
    a silently missing record."""
    try:
        with open(run_dir / METRICS, "a") as f:
            f.write(json.dumps(rec) + "\n")
    except OSError as e:
        raise unwritable(run_dir, e) from None
