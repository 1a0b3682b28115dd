"""The training loader of ``hd distill --targets-cache``: each epoch one of an image's K cached views (drawn from
the sample's seed, so a resumed run draws the same), its crop recomputed from the original image with the recorded
parameters (the cache holds no pixels), and its keep set and raw targets read from the cache by the record's
offset. A map-style loader over the images (``hdcli.data.loaders.MapLoader``): the rank split, the epoch order,
exact mid-epoch resume and the bad-sample budget are the data layer's; a record that cannot be read (a truncated
or corrupt shard) is skipped and counted like an unreadable image.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from hdcli import data
from hdcli.cache import layout
from hdcli.errors import HDError


class CacheRecords:
    """The images of a run's data joined with their cache records: ``raw(i)`` = (the image as the data gives it,
    the record's bytes); ``label(i)``, ``key(i)`` the image's."""

    def __init__(self, cache: Path, header: dict, images):
        self.images, self.cache = images, Path(cache)
        self.classes, self.where = images.classes, f"{cache} + {images.where}"
        n = header["data"]["images"]
        if len(images) != n:
            raise HDError(f"the cache {cache} was written from {n} images, the data now holds {len(images)}",
                          "train on the data the cache was written from, or write the cache again")
        self.offsets = np.full((n, 3), -1, dtype=np.int64)  # shard, offset, size
        missing = []
        for s in range(header["shards"]):
            tar, idx = self.cache / layout.shard_name(s), self.cache / layout.index_name(s)
            if not tar.exists() or not idx.exists():
                missing.append(tar.name)
                continue
            rows = np.load(idx)
            self.offsets[rows[:, 0], 0] = s
            self.offsets[rows[:, 0], 1:] = rows[:, 1:]
        if missing:
            raise HDError(f"the cache {cache} is incomplete: {len(missing)} of {header['shards']} shards missing "
                          f"(e.g. {missing[0]})", "finish it with the same `hd cache-targets` command")

    def __len__(self) -> int:
        return len(self.images)

    def label(self, i: int) -> int:
        return self.images.label(i)

    def key(self, i: int) -> str:
        return self.images.key(i)

    def raw(self, i: int):
        s, offset, size = (int(v) for v in self.offsets[i])
        with open(self.cache / layout.shard_name(s), "rb") as f:
            f.seek(offset)
            record = f.read(size)
        if len(record) != size:
            raise OSError(f"{layout.shard_name(s)} is truncated (record of image {i})")
        return self.images.raw(i), record

    load = raw


class CachedView:
    """Transform of a :class:`CacheRecords` sample: one of its K views (a uniform draw under the sample's seed),
    that view's crop of the image (the ``cpu`` decode path with the recorded parameters) and its cached keep set
    and targets. -> (uint8 [3, S, S], {name: tensor})."""

    raw = True

    def __init__(self, img_size: int, views: int, names: list[str]):
        self.crop = data.TrainCrop(img_size)
        self.views, self.names = views, names

    def __call__(self, sample):
        from PIL import Image
        from safetensors.torch import load

        from hdcli.data.decode import Crop

        image, record = sample
        tensors = load(record)
        meta = _metadata(record)
        k = int(torch.randint(self.views, ()))
        top, left, height, width, flip = json.loads(meta["views"])[k]
        img = Image.open(io.BytesIO(image)) if isinstance(image, bytes | bytearray) else image
        x = self.crop.apply(image, img, Crop(top, left, height, width, bool(flip)))
        return x, {name: tensors[f"v{k}.{name}"] for name in self.names}


def _metadata(record: bytes) -> dict:
    """The ``__metadata__`` of a safetensors blob (its JSON header)."""
    n = int.from_bytes(record[:8], "little")
    return json.loads(record[8:8 + n]).get("__metadata__", {})


def collate(items):
    """(image, targets) samples -> (images [B, 3, S, S], labels [B], {name: [B, ...]}); None for an empty batch."""
    items = [x for x in items if x is not None]
    if not items:
        return None
    images = torch.stack([x for (x, _), _ in items])
    labels = torch.tensor([y for _, y in items], dtype=torch.long)
    names = items[0][0][1].keys()
    return images, labels, {n: torch.stack([t[n] for (_, t), _ in items]) for n in names}


def loader(cfg, cache: str | Path, header: dict, *, batch_size: int, rank: int, world_size: int, seed: int,
           cuda: bool = False):
    """The training loader of a run from ``cache`` (its ``header`` already checked against the run)."""
    from hdcli.cache.write import open_source
    from hdcli.data.loaders import MapLoader

    records = CacheRecords(Path(cache), header, open_source(cfg))
    names = ["keep", *(layout.source_name((t["name"], b)) for t in header["targets"]
                       for b in (t["blocks"] or [None]))]
    d = cfg.data
    return MapLoader(records, transform=CachedView(d.img_size, header["views"], names), collate=collate,
                     num_workers=data.default_num_workers() if d.num_workers is None else d.num_workers, seed=seed,
                     epoch_steps=d.epoch_steps, pin_memory=cuda, kind="cache", spec=str(cache), batch_size=batch_size,
                     img_size=d.img_size, rank=rank, world_size=world_size, train=True,
                     max_bad_fraction=d.max_bad_fraction)


def targets_of(batch, keys: dict[str, tuple[str, int | None]]):
    """The cached teacher pass of a batch (on the device): ``TeacherTargets`` with fp32 values."""
    from hdcli.method.teacher import TeacherTargets

    cached = batch[2]
    return TeacherTargets(keep=cached["keep"].long(), values={src: cached[n].float() for n, src in keys.items()})
