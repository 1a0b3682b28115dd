"""What ``--data`` names: a :class:`Source` (``parse_source``), and the facts about names on disk every reader
shares: split names, shard file names and patterns, the cheap structural check of a shard, image files in a
folder tree. The bottom of :mod:`hdcli.data`: the readers (:mod:`~hdcli.data.records`, :mod:`~hdcli.data.shards`)
sit on it, the catalogue queries and loaders above them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hdcli import ui
from hdcli.errors import HDError, did_you_mean

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # first one present in a sample is its image
SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation", "test"), "test": ("test", "val", "validation")}
KNOWN_SPLITS = ("train", "val", "validation", "test")
SOURCE_NAMES = ("demo", "fashion-mnist", "fashion-mnist:DIR", "cifar100:DIR")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SOURCE_HINT = ("give 'demo', 'fashion-mnist[:DIR]', 'cifar100:DIR', an image folder (ROOT/CLASS/IMG.jpg) "
               "or WebDataset shards (DIR or DIR/train-{000000..000009}.tar)")


@dataclass(frozen=True)
class Source:
    """What the user asked for: ``kind`` in demo | fashion-mnist | cifar100 | folder | shards."""

    kind: str
    spec: str
    path: str | None = None


def parse_source(source: str | os.PathLike | Source | None) -> Source:
    """Resolve a ``--data`` value to a :class:`Source` (a Source is returned as it is: a run parses its source
    once and passes it on); HDError when the path is missing."""
    if isinstance(source, Source):
        return source
    if source is None or str(source) in ("", "demo"):
        return Source("demo", "demo")
    s = str(source)
    head, sep, rest = s.partition(":")
    if head in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return Source("fashion-mnist", s, str(Path(rest or FASHION_MNIST_DIR).expanduser()))
    if head in ("cifar100", "cifar-100"):
        if not rest:
            raise HDError("cifar100 needs a directory: cifar100:DIR",
                          "DIR holds cifar-100-python/ (train, test, meta) or cifar-100-python.tar.gz")
        return Source("cifar100", s, str(Path(rest).expanduser()))
    # Cheap checks here (a stat and 1 KiB per shard, a walk up to the first image): every command calls
    # parse_source before building models, so a wrong path fails before any heavy work (issue 10).
    if is_pattern(s) and not Path(s).expanduser().exists():  # a folder literally named imgs{1..2} is a folder
        for u in expand_pattern(s):
            check_tar(u)
        return Source("shards", s, s)
    p = Path(s).expanduser()
    if not p.exists():
        hint = did_you_mean(s, SOURCE_NAMES) if "/" not in s and not sep else SOURCE_HINT
        raise HDError(f"data path not found: {s}", hint)
    if p.is_file():
        if is_shard_name(p.name):
            check_tar(str(p))
            return Source("shards", s, str(p))
        raise HDError(f"not a data source: {s} is a file", SOURCE_HINT)
    tars = [f for f in p.iterdir() if is_shard_name(f.name) and f.is_file()]
    if (p / "_info.json").exists() or tars:
        for f in tars:
            check_tar(str(f))
        return Source("shards", s, str(p))
    if not _has_image(p):
        raise HDError(f"no images found in {p}", SOURCE_HINT)
    return Source("folder", s, str(p))


def _has_image(root: Path) -> bool:
    """Whether any image file lies under ``root`` (stops at the first one)."""
    return any(files for _, files in walk_images(root, warn=False))


def walk_images(root: str | os.PathLike, *, warn: bool = True):
    """(folder, image file names) for every folder under ``root``, links followed once.

    ``os.walk(followlinks=True)`` (timm's folder reader) never ends on a link loop (``ln -s . a/self``) and
    reads a folder reached by two links twice; here each physical folder is read once, and a link to a
    folder already read is skipped with a warning.
    """
    def key(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:  # a broken link
            return None
        return st.st_dev, st.st_ino

    root = os.fspath(root)
    seen = {key(root)}
    for folder, dirs, files in os.walk(root, topdown=True, followlinks=True):
        keep = []
        for d in sorted(dirs):
            k = key(os.path.join(folder, d))
            if k is None:
                continue
            if k in seen:
                if warn and ui.is_main_process():  # every rank walks the same folder
                    ui.warn(f"skipping {os.path.join(folder, d)}: a link to a folder already read (a loop or a "
                            "second way in); links are followed once")
                continue
            seen.add(k)
            keep.append(d)
        dirs[:] = keep
        yield folder, [f for f in files if f.lower().endswith(IMAGE_EXTS)]




def split_alias(split: str) -> str:
    """The canonical name of a split (``validation``/``eval`` -> ``val``, ``t10k`` -> ``test``)."""
    return {"validation": "val", "eval": "val", "t10k": "test"}.get(split, split)


def split_prefixed(name: str, splits) -> bool:
    """Whether a shard file name belongs to one of ``splits`` by its prefix (``train-000000.tar``, ``val_0.tar``)."""
    return name.startswith(tuple(f"{s}{c}" for s in splits for c in "-_"))


def is_pattern(s: str) -> bool:
    """Whether ``s`` names shard files (a brace/glob pattern or a .tar name) rather than a directory."""
    return any(c in s for c in "{*?[") or is_shard_name(s)


def is_shard_name(name: str) -> bool:
    """Whether a file name is a shard's (.tar, .tar.gz, .tgz)."""
    return name.endswith(SHARD_SUFFIXES)


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


