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
from hdcli.data.source import (
    KNOWN_SPLITS,
    SOURCE_HINT,
    SPLIT_DIRS,
    Source,
    check_tar,
    expand_pattern,
    is_shard_name,
    split_alias,
    split_prefixed,
)
from hdcli.errors import HDError

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


def info_split(info: dict, split: str) -> dict | None:
    """The entry of ``split`` in an ``_info.json`` (its aliases too), or None."""
    splits = info.get("splits", {})
    for name in SPLIT_DIRS.get(split, (split,)):
        if name in splits:
            return splits[name]
    return None


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


def open_shards(source: Source, split: str) -> ShardSet:
    """The shards of ``split`` with counts; checks every file before any worker starts."""
    split = split_alias(split)
    if source.kind != "shards":
        raise HDError(f"{source.spec} is not a WebDataset source")
    p = Path(source.path)
    if p.is_dir():
        info = read_info(p)
        entry = info_split(info, split)
        if entry is not None:
            urls = [str(p / f) for f in entry["filenames"]]
            missing = [u for u in urls if not os.path.isfile(u)]
            if missing:
                raise HDError(f"shard listed in {p / '_info.json'} is missing: {missing[0]}",
                              "copy it, or write the shards again with `hd data shards`")
        else:
            tars = sorted(str(f) for f in p.iterdir() if is_shard_name(f.name))
            if not tars:
                raise HDError(f"no shards (*.tar) found in {p}", SOURCE_HINT)
            named = {s: [t for t in tars if split_prefixed(os.path.basename(t), (s,))]
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





class ShardRecords:
    """Random access to the samples of WebDataset shards (``Records``' interface: ``len``, ``label(i)``, ``key(i)``,
    ``raw(i)`` the image's bytes, ``load(i)`` the decoded RGB image): each tar's member headers are read once, then
    a sample's image is one seek and one read. Used where samples are addressed by index (a target cache)."""

    def __init__(self, shards: ShardSet, image_keys: tuple[str, ...]):
        self.classes, self.where = shards.classes or [], shards.name
        self.urls = list(shards.urls)
        self.items: list[tuple[int, int, int, str, int]] = []  # (url index, offset, size, key, label)
        for u, url in enumerate(self.urls):
            self.items += _scan(url, image_keys, u)

    def __len__(self) -> int:
        return len(self.items)

    def label(self, i: int) -> int:
        return self.items[i][4]

    def key(self, i: int) -> str:
        return self.items[i][3]

    def raw(self, i: int) -> bytes:
        u, offset, size, _, _ = self.items[i]
        with open(self.urls[u], "rb") as f:
            f.seek(offset)
            return f.read(size)

    def load(self, i: int):
        from hdcli.data.transforms import open_image

        return open_image(self.raw(i))


def _scan(url: str, image_keys: tuple[str, ...], u: int) -> list[tuple[int, int, int, str, int]]:
    """(url index, data offset, size, key, label) of each sample of a shard with an image (the first of
    ``image_keys`` present), in the order of the tar; label -1 without a ``cls`` member."""
    from webdataset.tariterators import base_plus_ext

    samples: dict[str, dict] = {}
    try:
        with tarfile.open(url) as tf:
            for m in tf:
                prefix, ext = base_plus_ext(m.name)
                if not m.isreg() or not prefix or os.path.basename(m.name).startswith("__"):
                    continue
                entry = samples.setdefault(prefix, {})
                if ext == "cls":
                    entry["cls"] = int(tf.extractfile(m).read().strip() or -1)
                elif ext in image_keys and "image" not in entry:
                    entry["image"] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise HDError(f"cannot read shard {url}: {e}", "the tar is truncated or corrupt; copy or write it again") from None
    return [(u, *s["image"], key, s.get("cls", -1)) for key, s in samples.items() if "image" in s]
