"""hdcli.data and `hd data`: every reader on files the tests write, sharding across ranks and workers,
seeded augmentation, and the data faults of issue 10 (skipped + counted, or one-line errors)."""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import REPO
from PIL import Image

from hdcli import data
from hdcli.errors import HDError

# ---------------------------------------------------------------------------------------------- helpers


def index_of(img: Image.Image) -> torch.Tensor:
    """Transform for identity checks: an image made by `write_index_folder` -> its index, [1]."""
    r, g, _ = img.getpixel((0, 0))
    return torch.tensor([r + 256 * g])


def index_image(i: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (i % 256, i // 256, 0))


def write_index_folder(root: Path, n: int, classes: int = 3) -> Path:
    """root/c{k}/{i}.png, image i filled with colour (i % 256, i // 256, 0)."""
    for i in range(n):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        index_image(i).save(d / f"{i:04d}.png")
    return root


def jpeg_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (value, value, value)).save(buf, format="JPEG")
    return buf.getvalue()


def write_jpeg_shard(path: Path, n: int, corrupt: set[int] = frozenset()) -> None:
    with wds.TarWriter(str(path)) as w:
        for i in range(n):
            jpg = b"\xff\xd8\xff\xe0 not a jpeg at all" if i in corrupt else jpeg_bytes(i * 10)
            w.write({"__key__": f"sample{i:03d}", "jpg": jpg, "cls": str(i % 2).encode()})


def drain(loader):
    """All batches of one epoch: (list of image tensors, list of label tensors)."""
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return xs, ys


@pytest.fixture(scope="module")
def index_folder(tmp_path_factory):
    return write_index_folder(tmp_path_factory.mktemp("folder"), 40)


@pytest.fixture(scope="module")
def shards(index_folder, tmp_path_factory):
    """The 40 index images in 3 classes as shards of 7 (train split only: the folder has no val/)."""
    out = tmp_path_factory.mktemp("shards")
    data.write_shards(index_folder, out, maxcount=7)
    return out


# ------------------------------------------------------------------------------------------- pure math


def test_normalize_uint8_matches_hand_computation():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    y = data.normalize(x)
    expected = [(0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    assert y.dtype == torch.float32
    assert torch.allclose(y[0, :, 0, 0], torch.tensor(expected), atol=1e-6)


def test_normalize_leaves_float_batches_unchanged():
    x = torch.randn(2, 3, 4, 4)
    assert data.normalize(x) is x


def test_plan_two_ranks_give_the_batches_of_one_process_with_double_batch():
    single = list(data.plan_batches(50, batch_size=8, epoch=3, seed=1))
    r0 = list(data.plan_batches(50, batch_size=4, world_size=2, rank=0, epoch=3, seed=1))
    r1 = list(data.plan_batches(50, batch_size=4, world_size=2, rank=1, epoch=3, seed=1))
    assert len(single) == len(r0) == len(r1) == 50 // 8
    assert [a + b for a, b in zip(r0, r1, strict=True)] == single


def test_plan_eval_reads_every_sample_once_with_equal_batch_counts():
    ranks = [list(data.plan_batches(25, batch_size=4, world_size=3, rank=r, train=False)) for r in range(3)]
    assert {len(b) for b in ranks} == {math.ceil(25 / 12)}
    seen = sorted(i for batches in ranks for batch in batches for i, _ in batch)
    assert seen == list(range(25))


def test_plan_train_repeats_the_data_when_smaller_than_the_global_batch():
    batches = list(data.plan_batches(5, batch_size=4, world_size=2, rank=0, steps=3))
    assert [len(b) for b in batches] == [4, 4, 4]
    assert all(0 <= i < 5 for b in batches for i, _ in b)


def test_plan_epochs_are_different_permutations():
    e0 = [i for b in data.plan_batches(20, batch_size=20, epoch=0) for i, _ in b]
    e1 = [i for b in data.plan_batches(20, batch_size=20, epoch=1) for i, _ in b]
    assert sorted(e0) == sorted(e1) == list(range(20)) and e0 != e1


# ------------------------------------------------------------------------------------------------ demo


def test_demo_split_is_80_20_stratified():
    d = data.digits()
    assert (len(d["train"]), len(d["val"])) == (1437, 360)
    val_counts = np.bincount(d["val"].labels, minlength=10)
    all_counts = val_counts + np.bincount(d["train"].labels, minlength=10)
    assert np.all(np.abs(val_counts - 0.2 * all_counts) <= 1)


def test_demo_loader_gives_uint8_batches_and_len_per_epoch():
    loader = data.build_loader("demo", img_size=32, batch_size=64, num_workers=0)
    xs, ys = drain(loader)
    assert len(loader) == len(xs) == 1437 // 64
    assert xs[0].shape == (64, 3, 32, 32) and xs[0].dtype == torch.uint8
    assert ys[0].dtype == torch.long and 0 <= int(torch.cat(ys).min()) and int(torch.cat(ys).max()) <= 9


def test_demo_images_are_grey_rgb_digits():
    img = data.digits()["train"].load(0)
    a = np.asarray(img)
    assert a.shape == (32, 32, 3) and (a[..., 0] == a[..., 2]).all() and a.max() > 200


def test_two_ranks_with_workers_see_the_samples_and_crops_of_one_process():
    kw = dict(img_size=16, epoch_steps=3, seed=5)
    one = drain(data.build_loader("demo", batch_size=8, num_workers=0, **kw))
    r0 = drain(data.build_loader("demo", batch_size=4, world_size=2, rank=0, num_workers=2, **kw))
    r1 = drain(data.build_loader("demo", batch_size=4, world_size=2, rank=1, num_workers=0, **kw))
    for i in range(3):
        assert torch.equal(torch.cat([r0[0][i], r1[0][i]]), one[0][i])
        assert torch.equal(torch.cat([r0[1][i], r1[1][i]]), one[1][i])


def test_eval_pads_short_ranks_with_empty_batches_so_len_is_equal():
    # 360 val images, global batch 7 x 16 = 112: the 4th global batch holds 24 -> ranks 2..6 get none
    loaders = [data.build_loader("demo", split="val", img_size=16, batch_size=16, train=False, num_workers=0,
                                 rank=r, world_size=7) for r in (1, 6)]
    (x1, _), (x6, _) = (drain(loader) for loader in loaders)
    assert len(x1) == len(x6) == 4
    assert x1[-1].shape == (8, 3, 16, 16) and x6[-1].shape == (0, 3, 16, 16) and x6[-1].dtype == torch.uint8


def test_set_epoch_replays_an_epoch_from_a_given_batch():
    loader = data.build_loader("demo", img_size=16, batch_size=16, num_workers=0, epoch_steps=4)
    e0, e1 = drain(loader)[0], drain(loader)[0]
    assert not torch.equal(e0[0], e1[0])
    loader.set_epoch(0, start_batch=1)
    resumed = drain(loader)[0]
    assert len(resumed) == 3 and all(torch.equal(a, b) for a, b in zip(resumed, e0[1:], strict=True))


def test_sample_images_are_seeded_rgb_pil_images():
    a = data.sample_images("demo", 5, seed=1)
    b = data.sample_images("demo", 5, seed=1)
    assert len(a) == 5 and all(im.mode == "RGB" for im in a)
    assert [np.asarray(x).tobytes() for x in a] == [np.asarray(x).tobytes() for x in b]


# ------------------------------------------------------------------------------------------- shards


def test_info_json_is_read_by_timm(shards):
    from timm.data.readers.reader_wds import _parse_split_info

    info = json.loads((shards / "_info.json").read_text())
    split = _parse_split_info("train", info)
    assert split.num_samples == 40 and split.shard_lengths == (7, 7, 7, 7, 7, 5)
    assert all((shards / f).is_file() for f in split.filenames)
    assert info["num_classes"] == 3 and info["classes"] == ["c0", "c1", "c2"]


@pytest.mark.slow
def test_cli_shards_read_back_completely_across_two_ranks_and_two_workers(hd, index_folder, tmp_path):
    out = tmp_path / "shards"
    r = hd("data", "shards", str(index_folder), str(out), "--maxcount", "7")
    assert r.returncode == 0, r.stderr
    loaders = [data.build_loader(out, img_size=8, batch_size=3, train=False, num_workers=2,
                                 rank=r, world_size=2, transform=index_of) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1])
    seen = []
    for loader in loaders:
        xs, _ = drain(loader)
        assert len(xs) == len(loader)
        seen += torch.cat(xs).flatten().tolist()
    assert sorted(seen) == list(range(40))


def test_shard_labels_follow_the_folder_classes(shards):
    loader = data.build_loader(shards, img_size=8, batch_size=40, train=False, num_workers=0,
                               transform=index_of)
    (x,), (y,) = drain(loader)
    assert torch.equal(y, x.flatten() % 3)  # image i is in class c{i % 3}


def test_shard_training_gives_every_rank_len_full_batches(shards):
    loaders = [data.build_loader(shards, img_size=8, batch_size=4, num_workers=2, rank=r, world_size=2,
                                 transform=index_of) for r in range(2)]
    firsts = []
    for loader in loaders:
        xs, _ = drain(loader)
        assert len(loader) == len(xs) == math.ceil(40 / 8)
        assert all(x.shape[0] == 4 for x in xs)
        assert all(0 <= i < 40 for i in torch.cat(xs).flatten().tolist())
        firsts.append(xs[0].flatten().tolist())
    assert firsts[0] != firsts[1]


def test_shards_by_brace_pattern_without_info_json_are_counted(shards, tmp_path):
    for f in shards.glob("train-*.tar"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    pattern = str(tmp_path / "train-{000000..000005}.tar")
    loader = data.build_loader(pattern, img_size=8, batch_size=8, train=False, num_workers=0, transform=index_of)
    assert loader.num_samples == 40
    assert sorted(torch.cat(drain(loader)[0]).flatten().tolist()) == list(range(40))


def test_write_shards_refuses_to_overwrite_without_force(shards):
    with pytest.raises(HDError, match="already holds shards"):
        data.write_shards("demo", shards)


def test_sample_images_from_shards(shards):
    imgs = data.sample_images(shards, 4, split="train")
    assert len(imgs) == 4 and imgs[0].size == (8, 8) and imgs[0].mode == "RGB"


# ------------------------------------------------------------------------------------------- folders


def test_folder_with_split_dirs_uses_train_class_ids_for_val(tmp_path):
    for split, names in (("train", ["ant", "bee", "cat"]), ("val", ["bee", "cat"])):
        for k, name in enumerate(names):
            d = tmp_path / split / name
            d.mkdir(parents=True)
            index_image(k).save(d / "x.jpg")
    assert data.num_classes(tmp_path) == 3
    loader = data.build_loader(tmp_path, split="val", img_size=8, batch_size=4, train=False, num_workers=0)
    (x,), (y,) = drain(loader)
    assert x.shape == (2, 3, 8, 8) and y.tolist() == [1, 2]


def test_corrupt_image_in_folder_is_skipped_and_counted(tmp_path, capfd):
    root = write_index_folder(tmp_path, 9)
    (root / "c0" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    loader = data.build_loader(root, img_size=8, batch_size=10, train=False, num_workers=0,
                               transform=index_of, max_bad_fraction=0.2)
    (x,), _ = drain(loader)
    assert sorted(x.flatten().tolist()) == list(range(9)) and loader.bad_samples == 1
    assert "c0/broken.jpg" in capfd.readouterr().err


# -------------------------------------------------------------------------------------- fashion-mnist


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fmnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_idx_reader_round_trips_written_files(fmnist_dir):
    images = data.read_idx(fmnist_dir / "train-images-idx3-ubyte.gz")
    assert images.shape == (12, 28, 28) and images.dtype == np.uint8


def test_fashion_mnist_gives_grey_rgb_batches_per_split(fmnist_dir):
    loader = data.build_loader(f"fashion-mnist:{fmnist_dir}", split="val", img_size=28, batch_size=8,
                               train=False, num_workers=0)
    xs, ys = drain(loader)
    x = torch.cat(xs)
    assert x.shape == (5, 3, 28, 28) and torch.equal(x[:, 0], x[:, 2])
    assert torch.cat(ys).tolist() == [0, 1, 2, 3, 4]
    raw = data.read_idx(fmnist_dir / "t10k-images-idx3-ubyte.gz")
    assert torch.equal(x[:, 0], torch.from_numpy(raw.copy()))


def test_fashion_mnist_missing_files_name_the_package(tmp_path):
    with pytest.raises(HDError) as e:
        data.build_loader(f"fashion-mnist:{tmp_path}", img_size=28, batch_size=4)
    assert str(tmp_path) in str(e.value) and "dataset-fashion-mnist" in str(e.value)


def test_truncated_idx_file_names_the_file(fmnist_dir):
    path = fmnist_dir / "t10k-labels-idx1-ubyte.gz"
    write_idx(path, np.arange(5))
    raw = gzip.decompress(path.read_bytes())[:-2]
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(HDError, match="t10k-labels-idx1-ubyte.gz"):
        data.read_idx(path)


@pytest.mark.skipif(not Path(data.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_files_when_installed():
    train = data.open_records(data.parse_source("fashion-mnist"), "train")
    test = data.open_records(data.parse_source("fashion-mnist"), "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert set(np.unique(test.labels)) == set(range(10))


# ------------------------------------------------------------------------------------------- cifar100


def cifar_dict(n: int, offset: int) -> dict:
    rows = np.zeros((n, 3072), dtype=np.uint8)
    for i in range(n):
        rows[i, :1024], rows[i, 1024:2048], rows[i, 2048:] = offset + i, 100, 200  # R, G, B planes
    return {b"data": rows, b"fine_labels": [(offset + i) % 100 for i in range(n)],
            b"coarse_labels": [0] * n, b"filenames": [b"x.png"] * n, b"batch_label": b"b"}


@pytest.fixture
def cifar_dir(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for name, obj in (("train", cifar_dict(6, 0)), ("test", cifar_dict(4, 50)),
                      ("meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                b"coarse_label_names": [b"k"] * 20})):
        (d / name).write_bytes(pickle.dumps(obj))
    return tmp_path


def test_cifar100_pickles_give_rgb_planes_and_fine_labels(cifar_dir):
    loader = data.build_loader(f"cifar100:{cifar_dir}", split="val", img_size=32, batch_size=8, train=False,
                               num_workers=0)
    (x,), (y,) = drain(loader)
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [50, 51, 52, 53]
    assert x[1, :, 5, 7].tolist() == [51, 100, 200]
    assert data.classes(f"cifar100:{cifar_dir}")[51] == "c51" and data.num_classes(f"cifar100:{cifar_dir}") == 100


def test_cifar100_read_from_the_tar_gz(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tgz")
    with tarfile.open(out / "cifar-100-python.tar.gz", "w:gz") as tf:
        tf.add(cifar_dir / "cifar-100-python", arcname="cifar-100-python")
    records = data.open_records(data.parse_source(f"cifar100:{out}"), "train")
    assert len(records) == 6 and records.label(3) == 3


def test_corrupt_cifar100_file_names_the_file(cifar_dir):
    path = cifar_dir / "cifar-100-python" / "test"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(HDError, match=str(path)):
        data.build_loader(f"cifar100:{cifar_dir}", split="test", img_size=32, batch_size=4)


def test_missing_cifar100_file_names_the_file(cifar_dir):
    (cifar_dir / "cifar-100-python" / "meta").unlink()
    with pytest.raises(HDError, match=str(cifar_dir / "cifar-100-python" / "meta")):
        data.build_loader(f"cifar100:{cifar_dir}", img_size=32, batch_size=4)


# ------------------------------------------------------------------------------------- data faults


def test_corrupt_jpeg_in_shard_is_skipped_counted_and_named(tmp_path, capfd):
    write_jpeg_shard(tmp_path / "train-000000.tar", 20, corrupt={7})
    loader = data.build_loader(tmp_path, img_size=16, batch_size=5, train=False, num_workers=2,
                               max_bad_fraction=0.1)
    xs, _ = drain(loader)
    assert sum(len(x) for x in xs) == 19 and loader.bad_samples == 1 and loader.samples_seen == 20
    assert "sample007" in capfd.readouterr().err


def test_too_many_corrupt_samples_stop_with_an_error_naming_the_first(tmp_path):
    write_jpeg_shard(tmp_path / "train-000000.tar", 20, corrupt={3, 5, 7, 9, 11, 13})  # 6: one over the floor of 5
    loader = data.build_loader(tmp_path, img_size=16, batch_size=5, train=False, num_workers=0)
    with pytest.raises(HDError, match=r"more than the 5 allowed per epoch .*sample003"):
        drain(loader)


def test_one_unreadable_file_in_a_small_folder_is_skipped_with_a_warning(tmp_path, capfd):
    for i in range(40):
        _png(tmp_path / f"c{i % 2}" / f"{i}.png", i)
    (tmp_path / "c0" / "broken.png").write_bytes(b"\x89PNG not really")  # 0.1% of 41 images rounds to none
    loader = data.build_loader(tmp_path, img_size=8, batch_size=8, train=False, num_workers=0)  # reads all 41
    xs, _ = drain(loader)
    assert loader.bad_samples == 1 and sum(len(x) for x in xs) == 40
    assert "broken.png" in capfd.readouterr().err
    assert data.loaders.bad_image_budget(0.001, 41) == 5 and data.loaders.bad_image_budget(0.0, 41) == 0


def test_truncated_tar_is_an_error_naming_the_shard(tmp_path):
    path = tmp_path / "train-000000.tar"
    write_jpeg_shard(path, 20)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(HDError, match=str(path)):
        data.build_loader(tmp_path, img_size=16, batch_size=4)


def test_tar_cut_at_a_block_boundary_is_caught_while_reading(tmp_path):
    path = tmp_path / "train-000000.tar"
    write_jpeg_shard(path, 20)
    (tmp_path / "_info.json").write_text(json.dumps({"splits": {"train": {
        "name": "train", "num_samples": 20, "filenames": [path.name], "shard_lengths": [20]}}}))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2 // 512 * 512] + b"\0" * 1024)  # a valid-looking, shorter tar
    loader = data.build_loader(tmp_path, img_size=16, batch_size=4, train=False, num_workers=0)
    with pytest.raises(HDError, match=str(path)):
        drain(loader)


def test_empty_directory_is_an_error_naming_it(tmp_path):
    with pytest.raises(HDError, match=str(tmp_path)):
        data.build_loader(tmp_path, img_size=16, batch_size=4)


def test_brace_pattern_matching_nothing_is_an_error_naming_it(tmp_path):
    pattern = str(tmp_path / "train-{000000..000009}.tar")
    with pytest.raises(HDError, match=f"no shards match {pattern}"):
        data.build_loader(pattern, img_size=16, batch_size=4)


def test_missing_path_suggests_the_built_in_names():
    with pytest.raises(HDError) as e:
        data.build_loader("dmeo", img_size=16, batch_size=4)
    assert "dmeo" in e.value.problem and "demo" in e.value.hint


def test_impossible_numbers_fail_before_any_loading():
    with pytest.raises(HDError, match="batch size"):
        data.build_loader("demo", img_size=16, batch_size=0)
    with pytest.raises(HDError, match="rank 2"):
        data.build_loader("demo", img_size=16, batch_size=4, rank=2, world_size=2)


@pytest.mark.slow
def test_cli_errors_are_one_line_naming_the_path(hd, tmp_path):
    missing = tmp_path / "nowhere"
    r = hd("data", "shards", str(missing), str(tmp_path / "out"))
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(missing) in lines[0] and "Traceback" not in r.stderr


def test_default_num_workers_leaves_a_core_for_the_main_process():
    assert 0 <= data.default_num_workers() <= max(0, (os.cpu_count() or 1) - 1)


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def test_folder_records_match_timms_reader_on_a_plain_tree(tmp_path):
    from timm.data.readers.reader_image_folder import find_images_and_targets

    for i, name in enumerate(["b/img10.png", "b/img2.png", "a/x/1.png", "a/0.PNG", "c10/0.png", "c2/0.png"]):
        _png(tmp_path / name, i)
    ours = data.FolderRecords(str(tmp_path))
    theirs, class_to_idx = find_images_and_targets(str(tmp_path), types={".png", ".PNG"})
    assert ours.files == [f for f, _ in theirs] and ours.labels == [t for _, t in theirs]
    assert ours.classes == sorted(class_to_idx, key=class_to_idx.get)


def test_a_link_loop_in_an_image_folder_is_followed_once_with_a_warning(tmp_path):
    root = tmp_path / "imgs"
    for i in range(40):
        _png(root / ("a" if i % 2 else "b") / f"{i}.png", i)
    (root / "a" / "self").symlink_to(root)  # ln -s .. a/self: a loop (timm's reader never ends)
    (root / "twice").symlink_to(root / "b")  # a second way into b: read once
    # a wide console: at 80 columns the warning wraps where the tmp path's length puts it (pytest-99 vs -100)
    r = subprocess.run([sys.executable, "-m", "hdcli", "data", "info", str(root), "--json"], capture_output=True,
                       text=True, timeout=120, cwd=REPO, env={**os.environ, "COLUMNS": "400"})
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["splits"]["train"]["samples"] == 40 and info["classes"] == ["a", "b"]
    assert "links are followed once" in r.stderr and "a/self" in r.stderr


def test_a_folder_named_like_a_brace_pattern_is_a_folder(tmp_path):
    root = tmp_path / "imgs{1..2}"
    for i in range(4):
        _png(root / f"c{i % 2}" / f"{i}.png", i)
    assert data.parse_source(str(root)).kind == "folder"
    assert len(data.FolderRecords(str(root))) == 4
