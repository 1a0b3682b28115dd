"""What a data source holds: its splits, classes and sample counts, a few of its images, and whether a batch fits
(``hd data info``, the batch check before a run, the k-NN eval set). Every query takes a ``--data`` value or the
:class:`~hdcli.data.source.Source` a run parsed once."""
from __future__ import annotations

import os
import random
from pathlib import Path

from PIL import Image

from hdcli.data.records import cifar100_classes, open_records
from hdcli.data.shards import info_split, open_shards, read_info
from hdcli.data.source import (
    SHARD_IMAGE_KEYS,
    SPLIT_DIRS,
    Source,
    is_shard_name,
    parse_source,
    split_alias,
    split_prefixed,
)
from hdcli.data.transforms import open_image
from hdcli.errors import HDError

SourceLike = str | os.PathLike | Source | None


def has_split(source: SourceLike, split: str) -> bool:
    """Whether ``source`` holds a split of its own named ``split`` (``val`` also finds validation/ and test/);
    a source without one serves its whole data for every split (with a warning)."""
    src = parse_source(source)
    names = SPLIT_DIRS.get(split_alias(split), (split_alias(split),))
    if src.kind in ("demo", "fashion-mnist", "cifar100"):
        return True
    root = Path(src.path)
    if src.kind == "folder":
        return any((root / n).is_dir() for n in names)
    if not root.is_dir():
        return False  # a shard pattern names the files of one split
    if info_split(read_info(root), split) is not None:
        return True
    return any(is_shard_name(f.name) and split_prefixed(f.name, names) for f in root.iterdir())


def sample_images(source: SourceLike, n: int, *, split: str = "val", seed: int = 0) -> list[Image.Image]:
    """``n`` readable RGB images of ``split`` (original size), a seeded random choice; fewer if the split
    is smaller. For shards: the first readable samples of the shards in a seeded order."""
    src = parse_source(source)
    rng = random.Random(seed)
    out: list[Image.Image] = []
    if src.kind == "shards":
        shards = open_shards(src, split)
        urls = list(shards.urls)
        rng.shuffle(urls)
        import webdataset as wds

        for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
            data = next((sample[k] for k in SHARD_IMAGE_KEYS if k in sample), None)
            try:
                out.append(open_image(data))
            except Exception:
                continue
            if len(out) >= n:
                break
        return out
    records = open_records(src, split)
    order = list(range(len(records)))
    rng.shuffle(order)
    for i in order:
        if len(out) >= n:
            break
        try:
            out.append(records.load(i))
        except Exception:
            continue
    return out


def classes(source: SourceLike) -> list[str]:
    """Class names of a source (training split); shards need ``classes`` in their ``_info.json``."""
    src = parse_source(source)
    if src.kind == "shards":
        shards = open_shards(src, "train")
        if not shards.classes:
            raise HDError(f"the class list of {src.spec} is unknown",
                          "its _info.json has no 'classes' (`hd data shards` writes it)")
        return list(shards.classes)
    if src.kind == "cifar100":
        return cifar100_classes(src.path)
    return list(open_records(src, "train").classes)


def num_classes(source: SourceLike) -> int:
    """Number of classes of a source (demo 10, fashion-mnist 10, cifar100 100, folder: class dirs)."""
    src = parse_source(source)
    if src.kind in ("demo", "fashion-mnist"):
        return 10
    if src.kind == "cifar100":
        return 100
    return len(classes(src))



def num_samples(source: SourceLike, split: str = "train") -> int:
    """Images in ``split`` of a source (shards: from ``_info.json`` or counted from the tar headers)."""
    src = parse_source(source)
    return open_shards(src, split).num_samples if src.kind == "shards" else len(open_records(src, split))


def check_batch(source: SourceLike, batch_size: int, world_size: int = 1, split: str = "train") -> None:
    """HDError when one global batch (``batch_size`` × ``world_size``) needs more images than the split holds:
    an epoch would be one batch of repeated images (or the host would run out of memory building it)."""
    src = parse_source(source)
    n = num_samples(src, split)
    if batch_size * world_size > n:
        per = f"{batch_size} per process × {world_size} processes = {batch_size * world_size}" if world_size > 1 \
            else str(batch_size)
        raise HDError(f"a batch of {per} images is more than the {n} images of {src.spec} ({split})",
                      f"lower --batch-size to at most {max(1, n // world_size)}")


def describe(source: SourceLike) -> dict:
    """Kind, classes and per-split sample counts (and shard counts) of a source, for ``hd data info``."""
    src = parse_source(source)
    out: dict = {"source": src.spec, "kind": src.kind, "path": src.path, "splits": {}}
    splits = ["train", "val"]
    for split in splits:
        try:
            if src.kind == "shards":
                s = open_shards(src, split)
                out["splits"][split] = {"samples": s.num_samples, "shards": len(s.urls)}
                out.setdefault("classes", s.classes)
            else:
                r = open_records(src, split)
                out["splits"][split] = {"samples": len(r)}
                out.setdefault("classes", r.classes)
        except HDError as e:
            if split == "train":
                raise
            out["splits"][split] = {"error": e.problem}
    out["num_classes"] = len(out["classes"]) if out.get("classes") else None
    return out

