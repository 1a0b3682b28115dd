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

import gzip
import io
import json
import math
import multiprocessing as mp
import os
import pickle
import random
import signal
import struct
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from hdcli import ui
from hdcli.errors import HDError, did_you_mean

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # first one present in a sample is its image
SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation", "test"), "test": ("test", "val", "validation")}
KNOWN_SPLITS = ("train", "val", "validation", "test")
SOURCE_NAMES = ("demo", "fashion-mnist", "fashion-mnist:DIR", "cifar100:DIR")
SOURCE_HINT = ("give 'demo', 'fashion-mnist[:DIR]', 'cifar100:DIR', an image folder (ROOT/CLASS/IMG.jpg) "
               "or WebDataset shards (DIR or DIR/train-{000000..000009}.tar)")
SHUFFLE_BUFFER, SHUFFLE_INITIAL = 5000, 1000  # samples held per worker before decoding (open_clip's sizes)
MAX_WARNINGS = 20  # per loader; the count goes on past it

_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------------------
# Pure helpers


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 images [B, 3, H, W] (or [3, H, W]) -> float32 (x/255 - mean)/std on x's device.

    Float input is returned unchanged: it came from a caller-supplied transform (e.g. timm's
    ``create_transform``) that already normalised it.
    """
    if x.is_floating_point():
        return x
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 or float images, got {x.dtype}")
    m, s = _stats(tuple(mean), tuple(std), x.device)
    return (x.float() / 255.0 - m) / s


@lru_cache(maxsize=16)
def _stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean/std as [3, 1, 1] float32 tensors on ``device``, made once: a fresh host-to-device copy each step
    would be a blocking transfer in the hot path (issue 9, no host syncs in the step)."""
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)  # [3, 1, 1]
    s = torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)  # [3, 1, 1]
    return m, s


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 steps); same on every process and platform."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h & 0x7FFF_FFFF_FFFF_FFFF


def steps_per_epoch(n: int, *, batch_size: int, world_size: int = 1, train: bool = True,
                    steps: int | None = None) -> int:
    """Batches per epoch per rank of a map-style source (see :func:`plan_batches`)."""
    g = batch_size * world_size
    if train:
        return steps or max(1, n // g)
    full = math.ceil(n / g)
    return min(steps, full) if steps else full


def plan_batches(n: int, *, batch_size: int, world_size: int = 1, rank: int = 0, epoch: int = 0,
                 seed: int = 0, train: bool = True, steps: int | None = None,
                 start: int = 0) -> Iterator[list[tuple[int, int]]]:
    """This rank's batches of one epoch over ``n`` samples: lists of (sample index, sample seed).

    Global batch i holds ``batch_size * world_size`` positions of the epoch order; rank r takes
    positions [r*batch_size, (r+1)*batch_size) of it. So the union over ranks of batch i is batch i
    of a single process with ``batch_size * world_size``, and each sample's seed depends only on
    (seed, epoch, position): augmentations do not change with the number of ranks or workers.

    train: order = a fresh permutation per (seed, epoch), repeated when more samples are needed;
    ``steps`` batches (default: n // global batch, at least 1; the tail is dropped).
    eval: order = 0..n-1 once; ceil(n / global batch) batches (``steps`` caps it); the last global
    batch may leave some ranks a short or empty slice.
    ``start`` skips that many batches without touching the data (mid-epoch resume).
    """
    g = batch_size * world_size
    steps = steps_per_epoch(n, batch_size=batch_size, world_size=world_size, train=train, steps=steps)
    if train:
        need = steps * g
        gen = torch.Generator().manual_seed(mix_seed(seed, epoch))
        reps = math.ceil(need / n)
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(reps)])[:need]  # [need]
    else:
        order = torch.arange(min(n, steps * g))  # [<= steps*g]
    for i in range(start, steps):
        lo = i * g + rank * batch_size
        pos = range(lo, min(lo + batch_size, len(order)))
        yield [(int(order[p]), mix_seed(seed, epoch, p)) for p in pos]


@contextmanager
def seeded(seed: int):
    """Run a transform with torch's (CPU) and python's global RNGs seeded, restoring both afterwards.

    Uses the default generator directly: ``torch.random.fork_rng`` + ``manual_seed`` cost ~0.5 ms a
    sample, this ~20 us.
    """
    gen = torch.default_generator
    torch_state, py_state = gen.get_state(), random.getstate()
    gen.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        gen.set_state(torch_state)
        random.setstate(py_state)


def train_transform(img_size: int, *, scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5):
    """METHOD.md augmentation: RandomResizedCrop(img_size, scale, bicubic) + flip -> uint8 [3, S, S]."""
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(hflip),
        v2.PILToTensor(),
    ])


def eval_transform(img_size: int, *, crop_pct: float = 1.0):
    """Resize the shorter side to img_size / crop_pct (bicubic), centre-crop img_size -> uint8 [3, S, S]."""
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose([
        v2.Resize(int(round(img_size / crop_pct)), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
        v2.PILToTensor(),
    ])


def open_image(data: bytes | str | os.PathLike) -> Image.Image:
    """Decode fully (so truncation shows here, not later) and convert to RGB."""
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes | bytearray) else data)
    img.load()
    return img.convert("RGB")


# ---------------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class Source:
    """What the user asked for: ``kind`` in demo | fashion-mnist | cifar100 | folder | shards."""

    kind: str
    spec: str
    path: str | None = None


def parse_source(source: str | os.PathLike | None) -> Source:
    """Resolve a ``--data`` value to a :class:`Source`; HDError when the path is missing."""
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
    if _is_pattern(s):
        for u in expand_pattern(s):
            check_tar(u)
        return Source("shards", s, s)
    p = Path(s).expanduser()
    if not p.exists():
        hint = did_you_mean(s, SOURCE_NAMES) if "/" not in s and not sep else SOURCE_HINT
        raise HDError(f"data path not found: {s}", hint)
    if p.is_file():
        if _is_shard_name(p.name):
            check_tar(str(p))
            return Source("shards", s, str(p))
        raise HDError(f"not a data source: {s} is a file", SOURCE_HINT)
    tars = [f for f in p.iterdir() if _is_shard_name(f.name) and f.is_file()]
    if (p / "_info.json").exists() or tars:
        for f in tars:
            check_tar(str(f))
        return Source("shards", s, str(p))
    if not _has_image(p):
        raise HDError(f"no images found in {p}", SOURCE_HINT)
    return Source("folder", s, str(p))


def _has_image(root: Path) -> bool:
    """Whether any image file lies under ``root`` (stops at the first one)."""
    for _, _, files in os.walk(root, followlinks=True):
        if any(f.lower().endswith(IMAGE_EXTS) for f in files):
            return True
    return False


def _is_pattern(s: str) -> bool:
    return any(c in s for c in "{*?[") or s.endswith((".tar", ".tar.gz", ".tgz"))


def _is_shard_name(name: str) -> bool:
    return name.endswith((".tar", ".tar.gz", ".tgz"))


def _split_alias(split: str) -> str:
    return {"validation": "val", "eval": "val", "t10k": "test"}.get(split, split)


# -- records: random-access images of one split (map-style sources) ---------------------------------------


class Records:
    """Random access to one split: ``load(i) -> PIL RGB`` (may raise on a bad file), labels, keys."""

    classes: list[str]
    where: str  # shown in warnings

    def __len__(self) -> int:
        raise NotImplementedError

    def label(self, i: int) -> int:
        raise NotImplementedError

    def key(self, i: int) -> str:
        return str(i)

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def encoded(self, i: int) -> tuple[str, bytes]:
        """(extension, bytes) of sample i as stored in a shard (lossless PNG for arrays)."""
        buf = io.BytesIO()
        self.load(i).save(buf, format="PNG")
        return "png", buf.getvalue()


class ArrayRecords(Records):
    """Images held in memory: uint8 [N, H, W] (grey) or [N, H, W, 3]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], where: str):
        self.images, self.labels, self.classes, self.where = images, labels, classes, where

    def __len__(self) -> int:
        return len(self.images)

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i]).convert("RGB")

    def encoded(self, i: int) -> tuple[str, bytes]:
        buf = io.BytesIO()
        Image.fromarray(self.images[i]).save(buf, format="PNG")  # grey stays grey: 3x smaller
        return "png", buf.getvalue()


class FolderRecords(Records):
    """ROOT/CLASS/IMG files, found with timm's folder reader (natural sort, leaf folder = class)."""

    def __init__(self, root: str, classes: list[str] | None = None):
        from timm.data.readers.reader_image_folder import find_images_and_targets

        class_to_idx = {c: i for i, c in enumerate(classes)} if classes else None
        samples, class_to_idx = find_images_and_targets(root, types=set(IMAGE_EXTS) | {
            e.upper() for e in IMAGE_EXTS}, class_to_idx=class_to_idx)
        if not samples:
            raise HDError(f"no images found in {root}",
                          "expected ROOT/CLASS/IMG.jpg or ROOT/{train,val}/CLASS/IMG.jpg (jpg, png, webp, ...)")
        self.files = [f for f, _ in samples]
        self.labels = [t for _, t in samples]
        self.classes = sorted(class_to_idx, key=class_to_idx.get)
        self.root = self.where = root

    def __len__(self) -> int:
        return len(self.files)

    def label(self, i: int) -> int:
        return self.labels[i]

    def key(self, i: int) -> str:
        return os.path.relpath(self.files[i], self.root)

    def load(self, i: int) -> Image.Image:
        return open_image(self.files[i])

    def encoded(self, i: int) -> tuple[str, bytes]:
        ext = os.path.splitext(self.files[i])[1].lower().lstrip(".")
        ext = {"jpeg": "jpg"}.get(ext, ext)
        if ext in SHARD_IMAGE_KEYS:
            Image.open(self.files[i])  # header check: not an image -> raises, the writer skips it
            return ext, Path(self.files[i]).read_bytes()
        return super().encoded(i)


@lru_cache(maxsize=1)
def _digits() -> dict[str, ArrayRecords]:
    """sklearn's 1,797 bundled 8x8 digits (0..16), bicubic-upsampled to 32x32 RGB uint8, split 80/20
    stratified with a fixed seed: train 1,437, val 360."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] * (255.0 / 16.0)  # [N, 1, 8, 8]
    x = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False)  # [N, 1, 32, 32]
    x = x.clamp(0, 255).round().to(torch.uint8).expand(-1, 3, -1, -1)  # [N, 3, 32, 32]
    images = x.permute(0, 2, 3, 1).contiguous().numpy()  # [N, 32, 32, 3]
    labels = d.target.astype(np.int64)
    train, val = train_test_split(np.arange(len(images)), test_size=0.2, stratify=labels, random_state=0)
    classes = [str(c) for c in range(10)]
    return {name: ArrayRecords(images[np.sort(idx)], labels[np.sort(idx)], classes, f"demo/{name}")
            for name, idx in (("train", train), ("val", val))}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An unsigned-byte IDX file (``*-idx?-ubyte[.gz]``, the MNIST format) as a uint8 array."""
    path = str(path)
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise HDError(f"cannot read IDX file {path}: {e}", "the file is corrupt; reinstall or re-download it") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise HDError(f"not an unsigned-byte IDX file: {path}", "expected the MNIST *-idx?-ubyte format")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    payload = memoryview(data)[4 + 4 * ndim:]
    count = math.prod(dims)
    if len(payload) != count:
        raise HDError(f"IDX file {path} holds {len(payload)} bytes of data, its header says {count}",
                      "the file is truncated or corrupt; reinstall or re-download it")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).exists():
            return root / name
    raise HDError(
        f"Fashion-MNIST file {stem}.gz not found in {root}",
        "install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist) "
        "or pass fashion-mnist:DIR with the four *-idx?-ubyte.gz files")


@lru_cache(maxsize=4)
def _fashion_mnist(root: str, split: str) -> ArrayRecords:
    prefix = "train" if split == "train" else "t10k"
    images_file = _idx_file(Path(root), f"{prefix}-images-idx3-ubyte")
    labels_file = _idx_file(Path(root), f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise HDError(f"Fashion-MNIST files disagree: {images_file} has shape {images.shape}, "
                      f"{labels_file} has {labels.shape}", "the files are corrupt or mismatched")
    if labels.size and labels.max() >= 10:
        raise HDError(f"Fashion-MNIST labels in {labels_file} go up to {labels.max()}", "expected 0..9")
    return ArrayRecords(images, labels.astype(np.int64), FASHION_MNIST_CLASSES, f"{root}/{prefix}")


def _cifar_location(root: Path) -> tuple[Path, str | None]:
    """(directory or tar.gz, member prefix inside the tar) of a cifar-100-python copy under ``root``."""
    if root.is_file():
        return root, "cifar-100-python/"
    for d in (root / "cifar-100-python", root):
        if (d / "train").exists() or (d / "test").exists() or (d / "meta").exists():
            return d, None
    for name in ("cifar-100-python.tar.gz", "cifar-100-python.tgz"):
        if (root / name).exists():
            return root / name, "cifar-100-python/"
    if not root.exists():
        raise HDError(f"CIFAR-100 directory not found: {root}",
                      "download cifar-100-python.tar.gz and pass cifar100:DIR (its folder)")
    raise HDError(f"no CIFAR-100 data in {root}",
                  "expected DIR/cifar-100-python/{train,test,meta} or DIR/cifar-100-python.tar.gz")


def _cifar_pickle(root: Path, name: str) -> dict:
    where, prefix = _cifar_location(root)
    label = f"{where}:{prefix}{name}" if prefix else str(where / name)
    try:
        if prefix is None:
            if not (where / name).exists():
                raise HDError(f"CIFAR-100 file missing: {where / name}",
                              "the official cifar-100-python layout has train, test and meta")
            with open(where / name, "rb") as f:
                obj = pickle.load(f, encoding="bytes")
        else:
            with tarfile.open(where, "r:*") as tf:
                try:
                    f = tf.extractfile(prefix + name)
                except KeyError:
                    raise HDError(f"CIFAR-100 file missing: {label}",
                                  "the official archive holds cifar-100-python/{train,test,meta}") from None
                obj = pickle.load(f, encoding="bytes")
    except HDError:
        raise
    except Exception as e:
        raise HDError(f"cannot read CIFAR-100 file {label}: {type(e).__name__}: {e}",
                      "the file is corrupt or truncated; extract cifar-100-python.tar.gz again") from None
    if not isinstance(obj, dict):
        raise HDError(f"cannot read CIFAR-100 file {label}: not a dict", "not a cifar-100-python pickle")
    obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    obj["__file__"] = label
    return obj


@lru_cache(maxsize=2)
def _cifar100(root: str, split: str) -> ArrayRecords:
    name = "train" if split == "train" else "test"
    d = _cifar_pickle(Path(root), name)
    meta = _cifar_pickle(Path(root), "meta")
    try:
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d["fine_labels"], dtype=np.int64)
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta["fine_label_names"]]
        images = data.reshape(len(data), 3, 32, 32).transpose(0, 2, 3, 1)  # rows are R, G, B planes
    except (KeyError, ValueError, TypeError) as e:
        raise HDError(f"cannot read CIFAR-100 file {d['__file__']}: unexpected content ({type(e).__name__}: {e})",
                      "expected dicts with data [N, 3072] uint8, fine_labels and fine_label_names") from None
    if len(labels) != len(images):
        raise HDError(f"CIFAR-100 file {d['__file__']} has {len(images)} images and {len(labels)} labels",
                      "the file is corrupt")
    return ArrayRecords(np.ascontiguousarray(images), labels, classes, d["__file__"])


def _folder_split(root: Path, split: str) -> tuple[Path, bool]:
    """(folder of the split, True when the folder has split dirs)."""
    present = [d for d in KNOWN_SPLITS if (root / d).is_dir()]
    if not present:
        return root, False
    for name in SPLIT_DIRS.get(split, (split,)):
        if (root / name).is_dir():
            return root / name, True
    raise HDError(f"no '{split}' split in {root}", f"it has: {', '.join(present)}")


def _class_dirs(folder: Path) -> list[str]:
    from timm.utils.misc import natural_key

    return sorted((d.name for d in folder.iterdir() if d.is_dir()), key=natural_key)


def open_records(source: Source, split: str) -> Records:
    """Random-access records of one split of a map-style source (demo, fashion-mnist, cifar100, folder)."""
    split = _split_alias(split)
    if source.kind == "demo":
        d = _digits()
        return d["train" if split == "train" else "val"]
    if source.kind == "fashion-mnist":
        return _fashion_mnist(source.path, "train" if split == "train" else "test")
    if source.kind == "cifar100":
        return _cifar100(source.path, "train" if split == "train" else "test")
    if source.kind == "folder":
        root = Path(source.path)
        folder, has_splits = _folder_split(root, split)
        if not has_splits and split != "train":
            ui.warn(f"{root} has no {split}/ folder: using all its images for '{split}'")
        classes = None
        if has_splits and split != "train" and (root / "train").is_dir():
            # label ids of an eval split must be those of train (timm sorts class names naturally)
            train_classes, own = _class_dirs(root / "train"), _class_dirs(folder)
            if set(own) <= set(train_classes):
                classes = train_classes
        return FolderRecords(str(folder), classes)
    raise HDError(f"{source.spec} is WebDataset shards, not a folder or built-in set")


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
    """Samples (distinct keys) in a tar, reading headers only."""
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


# ---------------------------------------------------------------------------------------------------------
# Loaders


class SharedCounts:
    """Counters written by every DataLoader worker of one loader (shared memory; fork and spawn)."""

    def __init__(self):
        self.bad = mp.Value("q", 0)
        self.seen = mp.Value("q", 0)
        self.first_bad = mp.Array("c", 512)
        self.fault = mp.Array("c", 1024)

    def add_seen(self) -> None:
        with self.seen.get_lock():
            self.seen.value += 1

    def add_bad(self, key: str, where: str, err: BaseException) -> None:
        with self.bad.get_lock():
            self.bad.value += 1
            n = self.bad.value
            if n == 1:
                self.first_bad.value = f"{key} in {where}".encode()[:511]
        if n <= MAX_WARNINGS:
            ui.warn(f"skipping unreadable image {key} in {where}: {type(err).__name__}: {err}")
        elif n == MAX_WARNINGS + 1:
            ui.warn("more unreadable images: further warnings suppressed (still counted)")

    def tar_fault(self, exn: BaseException) -> bool:
        """webdataset handler for shard-level errors (truncated tar, unreadable file): record, stop."""
        url = next((a for a in reversed(exn.args) if isinstance(a, str) and _is_shard_name(a)), None)
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
        try:
            img = self.records.load(i)
        except Exception as e:  # a corrupt or truncated file: skipped and counted (issue 10)
            self.counts.add_bad(self.records.key(i), self.records.where, e)
            return None
        with seeded(seed):
            x = self.transform(img)
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
                img = open_image(data)
                label = int(sample["cls"]) if "cls" in sample else -1
            except Exception as e:  # corrupt bytes, truncated image, bad cls: skipped and counted
                self.counts.add_bad(key, url, e)
                continue
            with seeded(mix_seed(self.seed, self.epoch, self.rank, worker, i)):
                x = self.transform(img)
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
        if bad > self.max_bad_fraction * max(seen, epoch_samples):
            first = self.counts.first_bad.value.decode(errors="replace")
            raise HDError(
                f"{bad} unreadable images out of {seen} read from {self.spec}: more than the allowed "
                f"{self.max_bad_fraction:.2%} of an epoch ({epoch_samples} samples)",
                f"the first was {first}; fix or remove the bad files, or raise max_bad_fraction")


class MapLoader(Loader):
    """Loader over a map-style source (demo, fashion-mnist, cifar100, folder)."""

    def __init__(self, records: Records, *, transform: Callable, num_workers: int, seed: int,
                 epoch_steps: int | None, **kw):
        counts = SharedCounts()
        self.records = records
        self.sampler = _EpochBatches(len(records), batch_size=kw["batch_size"], world_size=kw["world_size"],
                                     rank=kw["rank"], seed=seed, train=kw["train"], steps=epoch_steps)
        super().__init__(num_samples=len(records), classes=records.classes, counts=counts,
                         length=self.sampler.total, **kw)
        self.dataset = _MapDataset(records, transform, counts)
        self._dl = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=num_workers, collate_fn=_collate,
            persistent_workers=num_workers > 0, worker_init_fn=_worker_init)

    def _batches(self, epoch: int, start: int):
        self.sampler.epoch, self.sampler.start = epoch, start
        return iter(self._dl)


class ShardLoader(Loader):
    """Loader over WebDataset shards: resampled for training, one exact pass for evaluation."""

    def __init__(self, shards: ShardSet, *, transform: Callable, num_workers: int, seed: int,
                 epoch_steps: int | None, **kw):
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
                                               worker_init_fn=_worker_init)

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


def augmented_loader(d, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> Loader:
    """The training loader of a ``[data]`` config section (``hdcli.config.DataConfig``): its source, size,
    workers and limits, with METHOD.md's augmentation (``train_transform``). Shared by distill and MAE
    pretraining."""
    return build_loader(
        d.source, split="train", img_size=d.img_size, batch_size=batch_size, train=True,
        num_workers=d.num_workers, rank=rank, world_size=world_size, seed=seed,
        transform=train_transform(d.img_size, scale=tuple(d.scale), hflip=d.hflip),
        epoch_steps=d.epoch_steps, max_bad_fraction=d.max_bad_fraction)


def build_loader(source: str | os.PathLike | None = None, *, split: str = "train", img_size: int,
                 batch_size: int, train: bool = True, num_workers: int | None = None, rank: int = 0,
                 world_size: int = 1, seed: int = 0, transform: Callable | None = None,
                 epoch_steps: int | None = None, max_bad_fraction: float = 0.001) -> Loader:
    """Batches of ``split`` of ``source`` for rank ``rank`` of ``world_size``; see the module docstring.

    transform: PIL RGB image -> tensor; default :func:`train_transform` (train) or :func:`eval_transform`.
    epoch_steps: batches per epoch per rank (default: one pass over the data).
    max_bad_fraction: unreadable images allowed per epoch before an HDError (default 0.1%).
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
    common = dict(transform=transform, num_workers=num_workers, seed=seed, epoch_steps=epoch_steps)
    if src.kind == "shards":
        return ShardLoader(open_shards(src, split), **common, **kw)
    return MapLoader(open_records(src, split), **common, **kw)


def sample_images(source: str | os.PathLike | None, n: int, *, split: str = "val", seed: int = 0) -> list[Image.Image]:
    """``n`` readable RGB images of ``split`` (original size), a seeded random choice; fewer if the split
    is smaller. For shards: the first readable samples of the shards in a seeded order."""
    src = parse_source(source)
    rng = random.Random(seed)
    out: list[Image.Image] = []
    if src.kind == "shards":
        shards = open_shards(src, split)
        urls = list(shards.urls)
        rng.shuffle(urls)
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


def classes(source: str | os.PathLike | None) -> list[str]:
    """Class names of a source (training split); shards need ``classes`` in their ``_info.json``."""
    src = parse_source(source)
    if src.kind == "shards":
        shards = open_shards(src, "train")
        if not shards.classes:
            raise HDError(f"the class list of {src.spec} is unknown",
                          "its _info.json has no 'classes' (`hd data shards` writes it)")
        return list(shards.classes)
    if src.kind == "cifar100":
        meta = _cifar_pickle(Path(src.path), "meta")
        return [c.decode() if isinstance(c, bytes) else str(c) for c in meta["fine_label_names"]]
    return list(open_records(src, "train").classes)


def num_classes(source: str | os.PathLike | None) -> int:
    """Number of classes of a source (demo 10, fashion-mnist 10, cifar100 100, folder: class dirs)."""
    src = parse_source(source)
    if src.kind in ("demo", "fashion-mnist"):
        return 10
    if src.kind == "cifar100":
        return 100
    return len(classes(source))


# ---------------------------------------------------------------------------------------------------------
# Shard writer


def _writable_splits(src: Source) -> list[str]:
    if src.kind == "folder":
        root = Path(src.path)
        present = [s for s in ("train", "val") if any((root / d).is_dir() for d in SPLIT_DIRS[s])]
        return present or ["train"]
    return ["train", "val"]


def write_shards(source: str | os.PathLike | None, out: str | os.PathLike, *, maxcount: int = 1000,
                 splits: list[str] | None = None, image_format: str = "auto", quality: int = 95,
                 seed: int = 0, shuffle: bool = True, name: str | None = None, force: bool = False,
                 on_progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Write ``OUT/{split}-{000000..}.tar`` (``maxcount`` samples each: ``<ext>`` image + ``cls``) and
    timm's ``OUT/_info.json``; returns the info dict. Train samples are shuffled (seeded) so that each
    shard mixes classes; other splits keep their order. Unreadable images are skipped with a warning.

    image_format: ``auto`` keeps a folder's jpg/png/webp bytes as they are and stores arrays as PNG;
    ``png``/``jpg``/``webp`` re-encode everything.
    """
    if maxcount < 1:
        raise HDError(f"--maxcount must be at least 1, got {maxcount}")
    if image_format not in ("auto", "png", "jpg", "webp"):
        raise HDError(f"unknown image format {image_format!r}", did_you_mean(image_format, ["auto", "png", "jpg", "webp"]))
    src = parse_source(source)
    if src.kind == "shards":
        raise HDError(f"{src.spec} is already WebDataset shards", "give an image folder, demo, fashion-mnist or cifar100:DIR")
    splits = [_split_alias(s) for s in (splits or _writable_splits(src))]
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    old = [f for f in out.iterdir() if f.name == "_info.json" or (_is_shard_name(f.name) and f.name.startswith(
        tuple(f"{s}-" for s in splits)))]
    if old and not force:
        raise HDError(f"{out} already holds shards ({old[0].name}, ...)", "use --force to replace them, or another OUT")
    for f in old:
        f.unlink()
    records = {s: open_records(src, s) for s in splits}
    info: dict = {"name": name or (src.kind if src.kind != "folder" else Path(src.path).name),
                  "num_classes": len(records[splits[0]].classes),
                  "classes": list(records[splits[0]].classes), "splits": {}}
    for split in splits:
        rec = records[split]
        order = list(range(len(rec)))
        if shuffle and split == "train":
            random.Random(seed).shuffle(order)
        filenames, lengths, skipped = [], [], 0
        writer, count, done = None, 0, 0
        try:
            for i in order:
                try:
                    ext, data = rec.encoded(i) if image_format == "auto" else _reencode(rec.load(i), image_format, quality)
                except Exception as e:
                    skipped += 1
                    ui.warn(f"skipping unreadable image {rec.key(i)} in {rec.where}: {type(e).__name__}: {e}")
                    continue
                if writer is None or count >= maxcount:
                    if writer is not None:
                        _close_shard(writer, out / filenames[-1])
                        lengths.append(count)
                    filenames.append(f"{split}-{len(filenames):06d}.tar")
                    writer, count = wds.TarWriter(str(out / (filenames[-1] + ".tmp")), mtime=0), 0
                writer.write({"__key__": f"{split}_{done:08d}", ext: data, "cls": str(rec.label(i)).encode()})
                count += 1
                done += 1
                if on_progress:
                    on_progress(split, done + skipped, len(rec))
        finally:
            if writer is not None:
                _close_shard(writer, out / filenames[-1])
                lengths.append(count)
        if skipped:
            ui.warn(f"{split}: skipped {skipped} unreadable images of {len(rec)}")
        info["splits"][split] = {"name": split, "num_samples": sum(lengths), "filenames": filenames,
                                 "shard_lengths": lengths}
    tmp = out / "_info.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out / "_info.json")
    return info


def _close_shard(writer, final: Path) -> None:
    writer.close()
    os.replace(str(final) + ".tmp", final)  # a crash never leaves a half-written shard under the final name


def _reencode(img: Image.Image, fmt: str, quality: int) -> tuple[str, bytes]:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG" if fmt == "jpg" else "WEBP", quality=quality)
    return fmt, buf.getvalue()


def describe(source: str | os.PathLike | None) -> dict:
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
