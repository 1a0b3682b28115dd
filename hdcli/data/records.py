"""Random-access :class:`Records` of one split of the map-style sources: the built-in demo digits, Fashion-MNIST,
CIFAR-100 and image folders (``open_records``)."""
from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import struct
import tarfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hdcli import ui
from hdcli.data.source import KNOWN_SPLITS, SHARD_IMAGE_KEYS, SPLIT_DIRS, Source, split_alias, walk_images
from hdcli.data.transforms import open_image
from hdcli.errors import HDError

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


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

    def raw(self, i: int) -> bytes | Image.Image:
        """Sample i as a ``raw`` transform takes it (``hdcli.data.decode``): the file's bytes, or a decoded RGB
        image where there is no file (arrays)."""
        return self.load(i)

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
    """ROOT/CLASS/IMG files as timm's folder reader finds them (natural sort, leaf folder = class), links
    followed once (:func:`walk_images`)."""

    def __init__(self, root: str, classes: list[str] | None = None):
        from timm.utils.misc import natural_key

        found = [(os.path.join(folder, f), os.path.basename(os.path.relpath(folder, root)) if folder != root else "")
                 for folder, files in walk_images(root) for f in files]  # timm's rule: the leaf folder is the class
        class_to_idx = ({c: i for i, c in enumerate(classes)} if classes else
                        {c: i for i, c in enumerate(sorted({label for _, label in found}, key=natural_key))})
        samples = sorted(((f, class_to_idx[label]) for f, label in found if label in class_to_idx),
                         key=lambda s: natural_key(s[0]))
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

    def raw(self, i: int) -> bytes:
        return Path(self.files[i]).read_bytes()

    def encoded(self, i: int) -> tuple[str, bytes]:
        ext = os.path.splitext(self.files[i])[1].lower().lstrip(".")
        ext = {"jpeg": "jpg"}.get(ext, ext)
        if ext in SHARD_IMAGE_KEYS:
            Image.open(self.files[i])  # header check: not an image -> raises, the writer skips it
            return ext, Path(self.files[i]).read_bytes()
        return super().encoded(i)


@lru_cache(maxsize=1)
def digits() -> dict[str, ArrayRecords]:
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


def cifar100_classes(root: str) -> list[str]:
    """The 100 fine class names of a cifar-100-python copy (its ``meta``)."""
    meta = _cifar_pickle(Path(root), "meta")
    return [c.decode() if isinstance(c, bytes) else str(c) for c in meta["fine_label_names"]]


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


@lru_cache(maxsize=8)
def _folder_records(folder: str, classes: tuple[str, ...] | None, stamp: tuple) -> FolderRecords:
    """One walk per folder and state (``stamp``): the batch check and the loader share it."""
    return FolderRecords(folder, list(classes) if classes else None)


def _stamp(folder: Path) -> tuple:
    """The modification times of a folder and its class folders: a file added or removed changes them."""
    with os.scandir(folder) as it:
        subs = sorted((e.name, e.stat().st_mtime_ns) for e in it if e.is_dir())
    return folder.stat().st_mtime_ns, tuple(subs)


def open_records(source: Source, split: str) -> Records:
    """Random-access records of one split of a map-style source (demo, fashion-mnist, cifar100, folder)."""
    split = split_alias(split)
    if source.kind == "demo":
        d = digits()
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
        return _folder_records(str(folder), tuple(classes) if classes else None, _stamp(folder))
    raise HDError(f"{source.spec} is WebDataset shards, not a folder or built-in set")


