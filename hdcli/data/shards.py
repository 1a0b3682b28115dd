"""WebDataset shards on disk: the shard files of a split, their sample counts (timm's ``_info.json`` or
counted from the tar headers) and cheap structural checks done before any worker starts."""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from hdcli import ui
from hdcli.data.sources import KNOWN_SPLITS, SOURCE_HINT, SPLIT_DIRS, Source, _split_alias
from hdcli.errors import HDError


def _is_pattern(s: str) -> bool:
    return any(c in s for c in "{*?[") or s.endswith((".tar", ".tar.gz", ".tgz"))


def _is_shard_name(name: str) -> bool:
    return name.endswith((".tar", ".tar.gz", ".tgz"))


# -- WebDataset shards ----------------------------------------------------------------------------------


@dataclass
class ShardSet:
    """The shard files of one split, their sample counts (``_info.json`` or counted) and classes."""

    urls: list[str]
    lengths: list[int]
    classes: list[str] | None
    name: str

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)


def read_info(directory: str | os.PathLike) -> dict:
    """timm's ``_info.json`` (or ``info.json``) in a shard directory; {} when there is none."""
    for name in ("_info.json", "info.json"):
        p = Path(directory) / name
        if p.exists():
            try:
                return json.loads(p.read_text())
            except (OSError, ValueError) as e:
                raise HDError(f"cannot read {p}: {e}", "fix or delete it (sample counts are then counted)") from None
    return {}


def _info_split(info: dict, split: str) -> dict | None:
    splits = info.get("splits", {})
    for name in SPLIT_DIRS.get(split, (split,)):
        if name in splits:
            return splits[name]
    return None


def check_tar(path: str) -> None:
    """Cheap structural check of an uncompressed tar: whole 512-byte blocks ending in the zero blocks
    that mark the end of an archive. One stat and one 1 KiB read: fine for thousands of shards."""
    size = os.path.getsize(path)
    hint = "the shard is truncated (an interrupted copy or write?); copy or write it again"
    if size == 0:
        raise HDError(f"shard is empty: {path}", hint)
    if not path.endswith(".tar"):
        return
    if size % 512 or size < 1024:
        raise HDError(f"truncated shard: {path} ({size} bytes, not whole 512-byte tar blocks)", hint)
    with open(path, "rb") as f:
        f.seek(-1024, os.SEEK_END)
        if f.read(1024).strip(b"\0"):
            raise HDError(f"truncated shard: {path} (no end-of-archive marker)", hint)


def count_samples(path: str) -> int:
    """Samples (distinct keys) in a tar, reading headers only (once per file and state)."""
    st = os.stat(path)
    return _count_samples(path, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4096)
def _count_samples(path: str, size: int, mtime: int) -> int:
    from webdataset.tariterators import base_plus_ext

    keys = set()
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                prefix, _ = base_plus_ext(m.name)
                if m.isreg() and prefix and not os.path.basename(m.name).startswith("__"):
                    keys.add(prefix)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise HDError(f"cannot read shard {path}: {e}",
                      "the tar is truncated or corrupt; copy or write it again") from None
    return len(keys)


def expand_pattern(pattern: str) -> list[str]:
    """Brace (``{000000..000009}``) and glob expansion; every name must exist."""
    import glob

    import braceexpand

    urls: list[str] = []
    for part in braceexpand.braceexpand(os.path.expanduser(pattern)):
        urls.extend(sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part])
    present = [u for u in urls if os.path.isfile(u)]
    if not present:
        raise HDError(f"no shards match {pattern}", "check the directory and the {first..last} range")
    if len(present) < len(urls):
        missing = [u for u in urls if not os.path.isfile(u)]
        raise HDError(f"{len(missing)} of the {len(urls)} shards in {pattern} are missing, e.g. {missing[0]}",
                      "fix the {first..last} range or copy the missing shards")
    return urls


def open_shards(source: Source, split: str) -> ShardSet:
    """The shards of ``split`` with counts; checks every file before any worker starts."""
    split = _split_alias(split)
    if source.kind != "shards":
        raise HDError(f"{source.spec} is not a WebDataset source")
    p = Path(source.path)
    if p.is_dir():
        info = read_info(p)
        entry = _info_split(info, split)
        if entry is not None:
            urls = [str(p / f) for f in entry["filenames"]]
            missing = [u for u in urls if not os.path.isfile(u)]
            if missing:
                raise HDError(f"shard listed in {p / '_info.json'} is missing: {missing[0]}",
                              "copy it, or write the shards again with `hd data shards`")
        else:
            tars = sorted(str(f) for f in p.iterdir() if _is_shard_name(f.name))
            if not tars:
                raise HDError(f"no shards (*.tar) found in {p}", SOURCE_HINT)
            named = {s: [t for t in tars if os.path.basename(t).startswith((f"{s}-", f"{s}_"))]
                     for s in KNOWN_SPLITS}
            urls = next((named[s] for s in SPLIT_DIRS.get(split, (split,)) if named.get(s)), [])
            if not urls:
                present = [s for s in KNOWN_SPLITS if named[s]]
                if present:
                    raise HDError(f"no '{split}' shards in {p}", f"it has: {', '.join(present)}")
                if split != "train":
                    ui.warn(f"{p} has no {split}-*.tar shards: using all its shards for '{split}'")
                urls = tars
        directory = p
    else:
        urls = expand_pattern(source.path)
        directory = Path(urls[0]).parent
        info = read_info(directory)
    for u in urls:
        check_tar(u)
    known = {}
    for entry in info.get("splits", {}).values():
        known.update(zip(entry.get("filenames", []), entry.get("shard_lengths", []), strict=False))
    lengths = [known[os.path.basename(u)] if os.path.basename(u) in known else count_samples(u) for u in urls]
    return ShardSet(urls, [int(n) for n in lengths], info.get("classes"), info.get("name", directory.name))



