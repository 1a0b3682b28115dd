"""``hd cache-targets``: run the teachers once over the data, for K augmented views per image, and write what the
student will need (the keep set and the raw targets on the prefix + kept tokens) to WebDataset shards
(:mod:`hdcli.cache.layout`). Each view is drawn with the training crop and flip of the recipe (METHOD.md) and
recorded as its parameters, so a run from the cache recomputes the very same crop from the original image.

Resumable: a shard is written to a temp file and renamed when complete; a new run of the same command keeps the
complete shards and writes the rest. Several processes (``torchrun``/``accelerate launch``) write shards i with
i % processes = rank. A full disk stops with one line, the temp file removed, the complete shards kept.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hdcli import data, ui
from hdcli.cache import layout
from hdcli.errors import HDError
from hdcli.models import vit
from hdcli.rundir import atomic_write
from hdcli.seeding import mix_seed, seeded
from hdcli.train.checkpoints import fault_injected, fmt_bytes

VIEW_SEED = 7  # the crop stream of a cached view: mix_seed(seed, VIEW_SEED, image, view)


@dataclass
class Plan:
    """What a cache holds: ``images`` images × ``views`` views in ``shards`` shards of ``per_shard`` images, and
    the bytes of one view (its keep set and targets at ``dtype``)."""

    images: int
    views: int
    per_shard: int
    view_bytes: int

    @property
    def shards(self) -> int:
        return max(1, math.ceil(self.images / self.per_shard))

    def estimate(self) -> str:
        per_epoch = self.view_bytes * self.images
        return (f"{fmt_bytes(self.view_bytes)} per view, {fmt_bytes(per_epoch)} per epoch ({self.images} images, one "
                f"view each), {fmt_bytes(per_epoch * self.views)} in all ({self.views} views per image, "
                f"{self.shards} shards; plus about 1 KB of headers per image)")


def open_source(cfg):
    """The training split of ``data.source`` as random-access records (map-style sources, or shards addressed
    by tar offsets)."""
    source = data.parse_source(cfg.data.source)
    if source.kind == "shards":
        from hdcli.data.shards import ShardRecords

        return ShardRecords(data.open_shards(source, "train"), data.SHARD_IMAGE_KEYS)
    return data.open_records(source, "train")


def build_method(cfg, *, meta_teachers: bool):
    """The run's method from its config (a meta-device student: only its grid and prefix tokens matter here)."""
    from hdcli.method import hybrid
    from hdcli.method.models import build_student, build_teacher, check_teacher_names

    dc = cfg.distill
    check_teacher_names(dc.teachers)
    with torch.device("meta"):
        student = build_student(_plain_student(cfg))
    models = {}
    for i, name in enumerate(dc.teachers):
        if name not in models:
            models[name] = build_teacher(name, cfg, i, meta=meta_teachers)
    cuda = torch.cuda.is_available() and not cfg.train.cpu
    return hybrid.build(student, models, dc, teacher_dtype=hybrid.teacher_dtype(dc.teacher_dtype,
                                                                                "cuda" if cuda else "cpu"))


def _plain_student(cfg):
    """The config with a random student: a cache needs its grid and prefix tokens, not its weights."""
    import copy

    one = copy.deepcopy(cfg)
    one.student.init, one.student.freeze_blocks, one.student.freeze = "random", 0, []
    return one


def view_bytes(method, dtype: str, n_keep: int) -> int:
    """Bytes of one cached view: each target value's elements at ``dtype`` plus the keep set (int32), from the
    shapes the teacher pass gives (computed on the meta device: nothing runs)."""
    tp = method.teacher_pass
    size = layout.DTYPES[dtype].itemsize
    total = 4 * n_keep
    for (_name, block), (t, _pair) in tp.sources().items():
        rows = len(tp.tokens[t.name].student) + n_keep
        if t.kind == "relations":
            heads = 1 if tp.relation_heads == "mean" else vit.num_heads(tp.model(t.teacher), block)
            total += heads * rows * rows * size
        else:
            total += rows * tp.width(t, block) * size
    return total


def write(cfg, out: str | os.PathLike, *, views: int = 2, dtype: str = "fp16", per_shard: int = 1000,
          batch_size: int | None = None, estimate: bool = False, rank: int = 0, world: int = 1) -> dict:
    """Write (or complete) the cache of ``cfg``'s teacher pass over its data in ``out``; returns the header.
    ``estimate``: print the sizes and stop before any teacher runs."""
    if views < 1:
        raise HDError(f"--views must be at least 1, got {views}")
    if dtype not in layout.DTYPES:
        raise HDError(f"unknown cache dtype {dtype!r}", f"use one of: {', '.join(layout.DTYPES)}")
    if per_shard < 1:
        raise HDError(f"--maxcount must be at least 1, got {per_shard}")
    out = Path(out).expanduser()
    records = open_source(cfg)
    meta_method = build_method(cfg, meta_teachers=True)
    plan = Plan(len(records), views, per_shard, view_bytes(meta_method, dtype, meta_method.n_keep))
    header = {"format": layout.FORMAT, **layout.describe(cfg, meta_method, num_images=len(records), views=views,
                                                         dtype=dtype),
              "shards": plan.shards, "per_shard": per_shard, "view_bytes": plan.view_bytes}
    if estimate or rank == 0:
        ui.info(f"cache of {cfg.data.source or 'demo'}: {plan.estimate()}")
    if estimate:
        return header
    _open(out, header, rank)
    method = build_method(cfg, meta_teachers=False)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and not cfg.train.cpu \
        else torch.device("cpu")
    tp = method.teacher_pass.to(device).eval()
    todo = [s for s in range(rank, plan.shards, world) if not (out / layout.shard_name(s)).exists()]
    crop = data.TrainCrop(cfg.data.img_size, scale=tuple(cfg.data.scale), hflip=cfg.data.hflip)
    batch = batch_size or cfg.train.batch_size
    t0, written = time.perf_counter(), 0
    with ui.progress() as bar:
        task = bar.add_task("cache", total=sum(min(per_shard, plan.images - s * per_shard) for s in todo))
        for s in todo:
            written += _write_shard(out, s, range(s * per_shard, min(plan.images, (s + 1) * per_shard)), records,
                                    crop, tp, cfg, views, dtype, batch, device,
                                    lambda n: bar.update(task, advance=n))
    seconds = time.perf_counter() - t0
    if written:
        ui.info(f"wrote {written} images × {views} views in {seconds:.1f} s ({written * views / max(seconds, 1e-9):.1f} "
                f"views/s) to {out}")
    return header


def _open(out: Path, header: dict, rank: int) -> None:
    """Create the cache dir with its header, or check that an existing one is of the same recipe and data."""
    path = out / layout.HEADER
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HDError(f"cannot write the cache to {out}: {e.strerror or e}", "check the path and free space") from None
    if path.exists():
        have = layout.read_header(out)
        diff = layout.first_difference({k: v for k, v in have.items() if k != "hd"}, header)
        if diff:
            raise HDError(f"{out} holds a cache of another recipe or data ({diff})",
                          "write to another --out, or delete it to start afresh")
        return
    if rank == 0:
        from hdcli import __version__

        try:
            atomic_write(path, json.dumps({**header, "hd": __version__}, indent=1) + "\n")
        except OSError as e:
            raise HDError(f"cannot write the cache to {out}: {e.strerror or e}", "check the path and free space") from None


def _write_shard(out: Path, s: int, images: range, records, crop, tp, cfg, views: int, dtype: str, batch: int,
                 device, advance) -> int:
    """One shard of records (temp files renamed when complete); the images it holds."""
    tmp_tar, tmp_idx = out / f".tmp-{layout.shard_name(s)}", out / f".tmp-{layout.index_name(s)}"
    index, written = [], 0
    try:
        with tarfile.open(tmp_tar, "w") as tar:
            for lo in range(images.start, images.stop, batch):
                chunk = list(range(lo, min(images.stop, lo + batch)))
                for i, blob in zip(chunk, _records(chunk, records, crop, tp, cfg, views, dtype, device), strict=True):
                    info = tarfile.TarInfo(f"{i:09d}.safetensors")
                    info.size, info.mtime = len(blob), 0
                    start = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))  # after its header
                    tar.addfile(info, io.BytesIO(blob))
                    index.append((i, start, len(blob)))
                    written += 1
                    if (n := fault_injected("cache_enospc_after")) is not None and i >= int(n):  # tests: image n
                        raise OSError(28, "No space left on device")
                advance(len(chunk))
        np.save(tmp_idx, np.asarray(index, dtype=np.int64).reshape(-1, 3))
        os.replace(tmp_idx, out / layout.index_name(s))
        os.replace(tmp_tar, out / layout.shard_name(s))  # last: a shard is complete when its tar exists
    except OSError as e:
        for f in (tmp_tar, tmp_idx):
            f.unlink(missing_ok=True)
        raise HDError(f"could not write {out / layout.shard_name(s)}: {e.strerror or e}",
                      "free some space (the complete shards are kept: the same command then writes the rest)") from None
    return written


def _records(chunk: list[int], records, crop, tp, cfg, views: int, dtype: str, device) -> list[bytes]:
    """The records of a batch of images: K crops each, one teacher pass over all of them."""
    from PIL import Image
    from safetensors.torch import save

    images, crops = [], []
    for i in chunk:
        raw = records.raw(i)
        for k in range(views):  # each view from a freshly opened image (a JPEG's draft decoding changes it)
            img = Image.open(io.BytesIO(raw)) if isinstance(raw, bytes | bytearray) else raw
            with seeded(mix_seed(cfg.train.seed, VIEW_SEED, i, k)):
                c = crop.sampler(*img.size)
            images.append(crop.apply(raw, img, c))
            crops.append(c)
    x = data.normalize(torch.stack(images).to(device))  # [B·K, 3, S, S]
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if _bf16(cfg, device) else nullcontext()
    with amp:
        targets = tp.from_hidden(tp.hidden(x, tp.wanted()), x, normalise=False)
    cast = layout.DTYPES[dtype]
    keep = targets.keep.to(torch.int32).cpu()  # one copy to the host per batch; rows cloned from it below
    values = {layout.source_name(src): v.to(cast).cpu() for src, v in targets.values.items()}
    out = []
    for j, i in enumerate(chunk):
        tensors, meta = {}, []
        for k in range(views):
            row = j * views + k
            tensors[f"v{k}.keep"] = keep[row].clone()  # own storage: safetensors refuses shared tensors
            for name, v in values.items():
                tensors[f"v{k}.{name}"] = v[row].clone()
            c = crops[row]
            meta.append([c.top, c.left, c.height, c.width, int(c.flip)])
        out.append(save(tensors, metadata={"image": str(i), "key": records.key(i), "views": json.dumps(meta)}))
    return out


def _bf16(cfg, device) -> bool:
    from hdcli.train.setup import resolve_mixed_precision

    return resolve_mixed_precision(cfg.train.mixed_precision, device.type == "cpu") == "bf16"
