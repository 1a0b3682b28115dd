"""Data for hd: the built-in demo digits, Fashion-MNIST, CIFAR-100, image folders and WebDataset shards.

Every source gives batches ``(images, labels)``: ``images`` uint8 [B, 3, H, W] on the host (float when a
caller-supplied ``transform`` returns floats), ``labels`` int64 [B] (-1 where a shard has no ``cls``).
The consumer moves a batch to its device and calls :func:`normalize` there (DESIGN.md data flow).

Sharding across processes is done here, never by ``accelerator.prepare`` (it would dispatch an
iterable dataset from rank 0 and silently drop data, DESIGN.md "Scale"):

* map-style sources (demo, fashion-mnist, cifar100, folders) cut one global batch of
  ``batch_size * world_size`` samples per step and give rank r its slice, so 2 ranks x batch b see
  exactly the samples, and augmentations, of 1 process x batch 2b. Each sample's augmentation is
  seeded by (seed, epoch, position in the epoch), never by the worker that happens to load it.
* WebDataset shards: training resamples shards (``ResampledShards``) with a seed per rank and worker and
  cuts the stream with ``with_epoch`` so every rank gets the same number of batches; evaluation is
  one deterministic pass, shards split by rank then by worker, shorter ranks padded with empty
  batches so ``len()`` is the same everywhere.

Unreadable images are skipped with a warning naming the sample and counted in memory shared by the
DataLoader workers (``loader.bad_samples``); more than ``max_bad_fraction`` of an epoch is an error.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import random
import re
import signal
from collections.abc import Callable
from functools import partial
from itertools import islice

import torch
import webdataset as wds

from hdcli import ui
from hdcli.data.decode import Encoded, EncodedBatch, augment, decode_path
from hdcli.data.plan import MIN_BAD_IMAGES, bad_image_budget, plan_batches, steps_per_epoch
from hdcli.data.records import Records, open_records
from hdcli.data.shards import ShardSet, open_shards
from hdcli.data.source import SHARD_IMAGE_KEYS, Source, is_shard_name, parse_source
from hdcli.data.transforms import eval_transform, open_image, train_transform
from hdcli.errors import HDError
from hdcli.seeding import mix_seed, seeded

SHUFFLE_BUFFER, SHUFFLE_INITIAL = 5000, 1000  # samples held per worker before decoding (open_clip's sizes)
MAX_WARNINGS = 20  # per loader; the count goes on past it


# ---------------------------------------------------------------------------------------------------------
# Loaders


class SharedCounts:
    """Counters written by every DataLoader worker of one loader (shared memory; fork and spawn)."""

    def __init__(self):
        self.bad = mp.Value("q", 0)
        self.seen = mp.Value("q", 0)
        self.first_bad = mp.Array("c", 512)
        self.fault = mp.Array("c", 1024)
        self.fallback = mp.Value("q", 0)  # gpu decode path: samples decoded on the CPU instead (not plain JPEGs)

    def add_seen(self) -> None:
        with self.seen.get_lock():
            self.seen.value += 1

    def count_fallback(self, x) -> None:
        if isinstance(x, Encoded) and x.crop is None:
            with self.fallback.get_lock():
                self.fallback.value += 1

    def add_bad(self, key: str, where: str, err: BaseException) -> None:
        with self.bad.get_lock():
            self.bad.value += 1
            n = self.bad.value
            if n == 1:
                self.first_bad.value = f"{key} in {where}".encode()[:511]
        if n <= MAX_WARNINGS:  # PIL names an in-memory file "<_io.BytesIO object at 0x...>": say which file it is
            why = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", str(key), str(err))
            ui.warn(f"skipping unreadable image {key} in {where}: {type(err).__name__}: {why}")
        elif n == MAX_WARNINGS + 1:
            ui.warn("more unreadable images: further warnings suppressed (still counted)")

    def tar_fault(self, exn: BaseException) -> bool:
        """webdataset handler for shard-level errors (truncated tar, unreadable file): record, stop."""
        url = next((a for a in reversed(exn.args) if isinstance(a, str) and is_shard_name(a)), None)
        msg = f"cannot read shard {url}: {exn.args[0] if exn.args else exn}" if url else f"cannot read shards: {exn}"
        self.fault.value = msg.encode()[:1023]
        return False


def _worker_init(_worker_id: int) -> None:
    """DataLoader workers ignore SIGINT/SIGTERM. Ctrl-C and SLURM signal the whole process group, and the
    main process still needs batches until it saves its checkpoint at the next step boundary (issue 10);
    the main process shuts its workers down, and they exit by themselves if it dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


def _worker_seed(rank: int) -> int:
    # wds.utils.pytorch_worker_seed reads RANK from the environment; ours is explicit (DESIGN.md).
    return rank * 1000 + _worker_id()


def _split_by_rank(src, rank: int, world_size: int):
    """Node split with an explicit rank (webdataset's split_by_node reads it from the environment)."""
    yield from islice(src, rank, None, world_size)


def _collate(items):
    items = [x for x in items if x is not None]
    if not items:
        return None
    if isinstance(items[0][0], Encoded):  # the gpu path: decoded where the batch goes (EncodedBatch.to)
        labels = torch.tensor([y for _, y in items], dtype=torch.long)
        return EncodedBatch.of([x for x, _ in items]), labels
    images = torch.stack([x for x, _ in items])  # [B, 3, H, W]
    labels = torch.tensor([y for _, y in items], dtype=torch.long)  # [B]
    return images, labels


class _MapDataset(torch.utils.data.Dataset):
    """Indexed by (index, sample seed) pairs from :func:`plan_batches`; None for an unreadable image."""

    def __init__(self, records: Records, transform: Callable, counts: SharedCounts):
        self.records, self.transform, self.counts = records, transform, counts

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]):
        i, seed = item
        self.counts.add_seen()
        raw = getattr(self.transform, "raw", False)  # hdcli.data.decode: bytes in, decoded by the transform
        try:
            img = self.records.raw(i) if raw else self.records.load(i)
            with seeded(seed):
                x = self.transform(img)
        except Exception as e:  # a corrupt or truncated file: skipped and counted (issue 10)
            self.counts.add_bad(self.records.key(i), self.records.where, e)
            return None
        self.counts.count_fallback(x)
        return x, self.records.label(i)


class _EpochBatches:
    """Batch sampler whose epoch the main process sets before each pass (works with persistent workers)."""

    def __init__(self, n: int, **plan):
        self.n, self.plan = n, plan
        self.epoch, self.start = 0, 0
        self.total = steps_per_epoch(n, batch_size=plan["batch_size"], world_size=plan["world_size"],
                                     train=plan["train"], steps=plan["steps"])

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self):
        return plan_batches(self.n, epoch=self.epoch, start=self.start, **self.plan)


class _Decode(wds.PipelineStage):
    """Decode + transform shard samples in the workers; bad ones skipped and counted."""

    def __init__(self, transform: Callable, counts: SharedCounts, seed: int, rank: int,
                 lengths: dict[str, int] | None = None):
        self.transform, self.counts, self.seed, self.rank = transform, counts, seed, rank
        # eval: samples each shard must hold; a tar cut at a block boundary reads as a shorter valid tar
        self.lengths = lengths
        self.epoch = 0

    def _check_count(self, url: str | None, n: int) -> None:
        if self.lengths is not None and url is not None and n != self.lengths.get(url, n):
            self.counts.fault.value = (f"shard {url} holds {n} samples, {self.lengths[url]} expected: "
                                       "it is truncated or _info.json is stale").encode()[:1023]

    def run(self, src):
        worker = _worker_id()
        current, count = None, 0
        for i, sample in enumerate(src):
            self.counts.add_seen()
            key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
            if url != current:
                self._check_count(current, count)
                current, count = url, 0
            count += 1
            try:
                data = next((sample[k] for k in SHARD_IMAGE_KEYS if k in sample), None)
                if data is None:
                    raise ValueError(f"no {'/'.join(SHARD_IMAGE_KEYS)} entry (has {sorted(sample)})")
                img = data if getattr(self.transform, "raw", False) else open_image(data)
                label = int(sample["cls"]) if "cls" in sample else -1
                with seeded(mix_seed(self.seed, self.epoch, self.rank, worker, i)):
                    x = self.transform(img)
            except Exception as e:  # corrupt bytes, truncated image, bad cls: skipped and counted
                self.counts.add_bad(key, url, e)
                continue
            self.counts.count_fallback(x)
            yield x, label
        self._check_count(current, count)


class _Shuffle(wds.PipelineStage):
    """Sample shuffle buffer seeded by (seed, epoch, rank, worker)."""

    def __init__(self, seed: int, rank: int, num_samples: int):
        self.seed, self.rank, self.epoch = seed, rank, 0
        # no use holding more than the data set: tiny sets would read it many times over first
        self.bufsize, self.initial = min(SHUFFLE_BUFFER, num_samples), min(SHUFFLE_INITIAL, num_samples)

    def run(self, src):
        rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, _worker_id()))
        return wds.filters._shuffle(src, self.bufsize, self.initial, rng)


def default_num_workers() -> int:
    """CPUs of this process / local ranks, minus one for the main process, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(8, cpus // max(1, local) - 1))


class Loader:
    """An iterable of ``(images, labels)`` batches for one rank; ``len()`` = batches per epoch per rank.

    Each ``iter()`` is one epoch; epochs count up from 0, or from ``set_epoch(e)``. ``bad_samples``
    and ``samples_seen`` count (over the loader's life) images skipped as unreadable and images read.
    Do not pass it through ``accelerator.prepare``: move the batches to the device yourself.
    """

    def __init__(self, *, kind: str, spec: str, num_samples: int, classes: list[str] | None, batch_size: int,
                 img_size: int, rank: int, world_size: int, train: bool, max_bad_fraction: float,
                 counts: SharedCounts, length: int):
        self.kind, self.spec, self.num_samples, self.classes = kind, spec, num_samples, classes
        self.batch_size, self.img_size, self.rank, self.world_size = batch_size, img_size, rank, world_size
        self.train, self.max_bad_fraction = train, max_bad_fraction
        self.counts, self._len = counts, length
        self.epoch, self._start = 0, 0
        self._last_shape, self._last_dtype = (3, img_size, img_size), torch.uint8

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes else None

    @property
    def bad_samples(self) -> int:
        return int(self.counts.bad.value)

    @property
    def samples_seen(self) -> int:
        return int(self.counts.seen.value)

    @property
    def cpu_fallbacks(self) -> int:
        """gpu decode path: samples decoded on the CPU (PNG, WebP, CMYK JPEGs, arrays) over the loader's life."""
        return int(self.counts.fallback.value)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next ``iter()`` is epoch ``epoch`` starting at batch ``start_batch`` (mid-epoch resume):
        it yields ``len(self) - start_batch`` batches."""
        self.epoch, self._start = int(epoch), int(start_batch)

    def __repr__(self) -> str:
        return (f"Loader({self.kind} {self.spec!r}, {self.num_samples} samples, {len(self)} batches of "
                f"{self.batch_size}, rank {self.rank}/{self.world_size}, {'train' if self.train else 'eval'})")

    def _batches(self, epoch: int, start: int):
        raise NotImplementedError

    def _empty(self):
        return torch.empty((0, *self._last_shape), dtype=self._last_dtype), torch.empty(0, dtype=torch.long)

    def __iter__(self):
        epoch, start = self.epoch, self._start
        self.epoch, self._start = epoch + 1, 0
        expected = max(0, len(self) - start)
        bad0, seen0 = self.bad_samples, self.samples_seen
        produced = 0
        try:
            for batch in self._batches(epoch, start):
                if produced >= expected:
                    break
                self._check_fault()
                self._check_bad(bad0, seen0)
                if batch is None:
                    batch = self._empty()
                else:
                    self._last_shape, self._last_dtype = tuple(batch[0].shape[1:]), batch[0].dtype
                produced += 1
                yield batch
        except HDError:
            raise
        except Exception:
            self._check_fault()  # a worker stopped on a shard fault: say which shard
            raise
        self._check_fault()
        self._check_bad(bad0, seen0)
        if start == 0 and produced == expected:
            self._check_complete(self.samples_seen - seen0)
        if produced < expected and self.train and self.kind == "shards":
            raise HDError(f"{self.spec} gave only {produced} of {expected} batches",
                          "too few readable samples; check the shards with `hd data info`")
        while produced < expected:  # eval: ranks with fewer samples pad with empty batches
            produced += 1
            yield self._empty()

    def close(self) -> None:
        """Stop the DataLoader's persistent workers now. They ignore SIGTERM (``_worker_init``), so a loader still
        alive when the interpreter exits would leave multiprocessing's exit handler waiting for them."""
        it = getattr(getattr(self, "_dl", None), "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
            self._dl._iterator = None

    def _check_complete(self, seen: int) -> None:
        """After a whole epoch: hook for loaders that know how many samples it must have read."""

    def _check_fault(self) -> None:
        msg = self.counts.fault.value.decode(errors="replace")
        if msg:
            raise HDError(msg, "the tar is truncated or corrupt; copy or write it again")

    def _check_bad(self, bad0: int, seen0: int) -> None:
        bad = self.bad_samples - bad0
        if not bad:
            return
        seen = self.samples_seen - seen0
        epoch_samples = len(self) * self.batch_size
        budget = bad_image_budget(self.max_bad_fraction, max(seen, epoch_samples))
        if bad > budget:
            first = self.counts.first_bad.value.decode(errors="replace")
            raise HDError(
                f"{bad} unreadable images out of {seen} read from {self.spec}: more than the {budget} allowed per "
                f"epoch ({self.max_bad_fraction:.2%} of {epoch_samples} samples, at least {MIN_BAD_IMAGES})",
                f"the first was {first}; fix or remove the bad files, or raise max_bad_fraction")


class MapLoader(Loader):
    """Loader over a map-style source (demo, fashion-mnist, cifar100, folder), or any random-access records
    (a target cache joined with its images: ``collate`` builds its batches)."""

    def __init__(self, records: Records, *, transform: Callable, num_workers: int, seed: int,
                 epoch_steps: int | None, pin_memory: bool = False, collate: Callable = _collate, **kw):
        counts = SharedCounts()
        self.records = records
        self.sampler = _EpochBatches(len(records), batch_size=kw["batch_size"], world_size=kw["world_size"],
                                     rank=kw["rank"], seed=seed, train=kw["train"], steps=epoch_steps)
        super().__init__(num_samples=len(records), classes=records.classes, counts=counts,
                         length=self.sampler.total, **kw)
        self.dataset = _MapDataset(records, transform, counts)
        self._dl = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=num_workers, collate_fn=collate,
            persistent_workers=num_workers > 0, worker_init_fn=_worker_init, pin_memory=pin_memory)

    def _batches(self, epoch: int, start: int):
        self.sampler.epoch, self.sampler.start = epoch, start
        return iter(self._dl)


class ShardLoader(Loader):
    """Loader over WebDataset shards: resampled for training, one exact pass for evaluation."""

    def __init__(self, shards: ShardSet, *, transform: Callable, num_workers: int, seed: int,
                 epoch_steps: int | None, pin_memory: bool = False, **kw):
        counts = SharedCounts()
        b, world, rank, train = kw["batch_size"], kw["world_size"], kw["rank"], kw["train"]
        self.shards, self.seed = shards, seed
        nw = max(1, num_workers)
        self._decode = _Decode(transform, counts, seed, rank,
                               lengths=None if train else dict(zip(shards.urls, shards.lengths, strict=True)))
        self._expected = None
        reader = wds.tarfile_to_samples(handler=counts.tar_fault)
        if train:
            length = epoch_steps or max(1, math.ceil(shards.num_samples / (b * world)))
            self._resampled = wds.ResampledShards(shards.urls, deterministic=True,
                                                  worker_seed=partial(_worker_seed, rank))
            self._shuffle = _Shuffle(seed, rank, max(1, shards.num_samples))
            pipeline = wds.DataPipeline(self._resampled, reader, self._shuffle, self._decode,
                                        wds.batched(b, collation_fn=_collate, partial=False))
            pipeline = pipeline.with_epoch(math.ceil(length / nw))  # per worker; __iter__ cuts at length
        else:
            per_rank = []
            for r in range(world):
                mine = list(range(len(shards.urls)))[r::world]
                per_rank.append(sum(math.ceil(sum(shards.lengths[i] for i in mine[w::nw]) / b) for w in range(nw)))
            length = max(per_rank)
            if not epoch_steps or epoch_steps >= length:  # a full pass: check every sample was read
                self._expected = sum(shards.lengths[i] for i in range(len(shards.urls))[rank::world])
            else:
                length = epoch_steps
            if len(shards.urls) < world and rank == 0:
                ui.warn(f"{len(shards.urls)} shards for {world} ranks: some ranks get only empty batches")
            pipeline = wds.DataPipeline(wds.SimpleShardList(shards.urls),
                                        partial(_split_by_rank, rank=rank, world_size=world),
                                        wds.split_by_worker, reader, self._decode,
                                        wds.batched(b, collation_fn=_collate, partial=True))
        super().__init__(num_samples=shards.num_samples, classes=shards.classes, counts=counts, length=length, **kw)
        self._dl = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                                               worker_init_fn=_worker_init, pin_memory=pin_memory)

    def _check_complete(self, seen: int) -> None:
        if self._expected is not None and seen != self._expected:
            raise HDError(f"{self.spec} ({self.kind}) gave {seen} samples to rank {self.rank}, its shards "
                          f"should hold {self._expected}", "a shard is truncated or _info.json is stale; "
                          "write the shards again or delete _info.json to count them")

    def _batches(self, epoch: int, start: int):
        self._decode.epoch = epoch
        if self.train:
            # A resumed epoch draws a fresh stream (seeded by the start batch) instead of decoding and
            # discarding `start` batches: shards are resampled anyway.
            self._resampled.seed = mix_seed(self.seed, epoch, start)
            self._resampled.epoch = -1
            self._shuffle.epoch = mix_seed(epoch, start)
            return iter(self._dl)
        return islice(iter(self._dl), start, None)


def augmented_loader(d, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                     cuda: bool = False, source: Source | None = None) -> Loader:
    """The training loader of a ``[data]`` config section (``hdcli.config.DataConfig``): its source (``source``:
    the run's parsed one), size, workers and limits, with METHOD.md's augmentation by ``data.decode`` (``cuda``:
    the batches go to a CUDA device, where ``auto`` decodes JPEGs). Shared by distill and MAE pretraining."""
    source = parse_source(d.source if source is None else source)
    path = decode_path(getattr(d, "decode", "auto"), cuda, source)
    return build_loader(
        source, split="train", img_size=d.img_size, batch_size=batch_size, train=True,
        num_workers=d.num_workers, rank=rank, world_size=world_size, seed=seed,
        transform=augment(d.img_size, scale=tuple(d.scale), hflip=d.hflip, decode=path),
        epoch_steps=d.epoch_steps, max_bad_fraction=d.max_bad_fraction, pin_memory=cuda)


def build_loader(source: str | os.PathLike | Source | None = None, *, split: str = "train", img_size: int,
                 batch_size: int, train: bool = True, num_workers: int | None = None, rank: int = 0,
                 world_size: int = 1, seed: int = 0, transform: Callable | None = None,
                 epoch_steps: int | None = None, max_bad_fraction: float = 0.001,
                 pin_memory: bool = False) -> Loader:
    """Batches of ``split`` of ``source`` for rank ``rank`` of ``world_size``; see the module docstring.

    transform: PIL RGB image -> tensor; default :func:`train_transform` (train) or :func:`eval_transform`.
    epoch_steps: batches per epoch per rank (default: one pass over the data).
    max_bad_fraction: unreadable images allowed per epoch before an HDError (default 0.1%).
    pin_memory: the workers' batches are copied to pinned memory (CUDA: the engine's copy is asynchronous).
    """
    if batch_size < 1:
        raise HDError(f"batch size must be at least 1, got {batch_size}")
    if img_size < 1:
        raise HDError(f"image size must be at least 1, got {img_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise HDError(f"rank {rank} is not in 0..{world_size - 1}")
    if epoch_steps is not None and epoch_steps < 1:
        raise HDError(f"epoch steps must be at least 1, got {epoch_steps}")
    if not 0 <= max_bad_fraction <= 1:
        raise HDError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    src = parse_source(source)
    if transform is None:
        transform = train_transform(img_size) if train else eval_transform(img_size)
    num_workers = default_num_workers() if num_workers is None else num_workers
    kw = dict(kind=src.kind, spec=src.spec, batch_size=batch_size, img_size=img_size, rank=rank,
              world_size=world_size, train=train, max_bad_fraction=max_bad_fraction)
    common = dict(transform=transform, num_workers=num_workers, seed=seed, epoch_steps=epoch_steps,
                  pin_memory=pin_memory)
    if src.kind == "shards":
        return ShardLoader(open_shards(src, split), **common, **kw)
    return MapLoader(open_records(src, split), **common, **kw)



