"""Data for hd: the built-in demo digits, Fashion-MNIST, CIFAR-100, image folders and WebDataset shards.

One module a job (docs/design.md):

- :mod:`~hdcli.data.source`: what ``--data`` names (``parse_source``), split and shard names, the shard check;
- :mod:`~hdcli.data.transforms`: METHOD.md's augmentation, the eval crop, decoding, device-side ``normalize``;
- :mod:`~hdcli.data.decode`: the training crop's decode paths (pil, cpu, gpu);
- :mod:`~hdcli.data.records`: random-access records of a split of the map-style sources (demo, folders, ...);
- :mod:`~hdcli.data.shards`: WebDataset shard files of a split and their counts;
- :mod:`~hdcli.data.catalogue`: what a source holds (splits, classes, counts, sample images, the batch check);
- :mod:`~hdcli.data.plan`: which samples each rank gets each epoch, the bad-image budget;
- :mod:`~hdcli.data.loaders`: per-rank batches (``build_loader``), seeded per sample, bad images counted;
- :mod:`~hdcli.data.writer`: ``hd data shards``.

The names below are the package's API (``from hdcli import data; data.build_loader(...)``).
"""

from hdcli.data.catalogue import (
    check_batch,
    classes,
    describe,
    has_split,
    num_classes,
    num_samples,
    sample_images,
)
from hdcli.data.decode import CropSampler, EncodedBatch, EncodedCrop, TrainCrop, augment, decode_path
from hdcli.data.loaders import (
    Loader,
    MapLoader,
    ShardLoader,
    augmented_loader,
    build_loader,
    default_num_workers,
)
from hdcli.data.plan import plan_batches, steps_per_epoch
from hdcli.data.records import (
    FASHION_MNIST_CLASSES,
    ArrayRecords,
    FolderRecords,
    Records,
    digits,
    open_records,
    read_idx,
)
from hdcli.data.shards import ShardSet, count_samples, open_shards, read_info
from hdcli.data.source import (
    FASHION_MNIST_DIR,
    IMAGE_EXTS,
    KNOWN_SPLITS,
    SHARD_IMAGE_KEYS,
    SOURCE_HINT,
    SPLIT_DIRS,
    Source,
    check_tar,
    expand_pattern,
    is_pattern,
    parse_source,
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
    "Records", "ShardLoader", "ShardSet", "Source", "augmented_loader", "build_loader",
    "check_batch", "check_tar", "classes", "count_samples", "default_num_workers", "describe", "digits", "eval_transform",
    "has_split", "expand_pattern", "is_pattern",
    "mix_seed", "normalize", "num_classes", "num_samples", "open_image", "open_records", "open_shards", "parse_source",
    "plan_batches", "read_idx", "read_info", "sample_images", "seeded", "steps_per_epoch", "train_transform",
    "write_shards",
]
