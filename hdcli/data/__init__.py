"""Data for hd: the built-in demo digits, Fashion-MNIST, CIFAR-100, image folders and WebDataset shards.

One module a job (docs/design.md):

- :mod:`~hdcli.data.transforms`: METHOD.md's augmentation, the eval crop, decoding, device-side ``normalize``;
- :mod:`~hdcli.data.sources`: what ``--data`` names (``parse_source``) and random-access records of a split;
- :mod:`~hdcli.data.shards`: WebDataset shard files, their counts and checks;
- :mod:`~hdcli.data.loaders`: per-rank batches (``build_loader``), seeded per sample, bad images counted;
- :mod:`~hdcli.data.writer`: ``hd data shards``.

The names below are the package's API (``from hdcli import data; data.build_loader(...)``).
"""

from hdcli.data.decode import CropSampler, EncodedBatch, EncodedCrop, TrainCrop
from hdcli.data.loaders import (
    Loader,
    MapLoader,
    ShardLoader,
    augment,
    augmented_loader,
    build_loader,
    decode_path,
    default_num_workers,
    plan_batches,
    steps_per_epoch,
)
from hdcli.data.shards import (
    ShardSet,
    _is_pattern,
    check_tar,
    count_samples,
    expand_pattern,
    open_shards,
    read_info,
)
from hdcli.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    IMAGE_EXTS,
    KNOWN_SPLITS,
    SHARD_IMAGE_KEYS,
    SOURCE_HINT,
    SPLIT_DIRS,
    ArrayRecords,
    FolderRecords,
    Records,
    Source,
    _digits,
    check_batch,
    classes,
    describe,
    has_split,
    num_classes,
    num_samples,
    open_records,
    parse_source,
    read_idx,
    sample_images,
)
from hdcli.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    normalize,
    open_image,
    train_transform,
)
from hdcli.data.writer import write_shards
from hdcli.seeding import mix_seed, seeded

__all__ = [
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTS", "KNOWN_SPLITS",
    "SHARD_IMAGE_KEYS", "SOURCE_HINT", "SPLIT_DIRS", "ArrayRecords", "CropSampler", "EncodedBatch", "EncodedCrop", "FolderRecords",
    "Loader", "MapLoader", "TrainCrop", "augment", "decode_path",
    "Records", "ShardLoader", "ShardSet", "Source", "_digits", "_is_pattern", "augmented_loader", "build_loader",
    "check_batch", "check_tar", "classes", "count_samples", "default_num_workers", "describe", "eval_transform", "has_split", "expand_pattern",
    "mix_seed", "normalize", "num_classes", "num_samples", "open_image", "open_records", "open_shards", "parse_source",
    "plan_batches", "read_idx", "read_info", "sample_images", "seeded", "steps_per_epoch", "train_transform",
    "write_shards",
]
