"""The training crop's decode paths (hdcli.data.decode): the same random crop and flip on every path; what the
faster CPU path and the GPU path (run here on the CPU device) change, bounded; mixed folders and shards."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from hdcli import data
from hdcli.data.decode import CropSampler, EncodedBatch, EncodedCrop, TrainCrop
from hdcli.seeding import seeded

pytestmark = pytest.mark.usefixtures("one_thread")


def _photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a) for a in load_sample_images().images]  # two 427x640 real photos


def _jpeg(img: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def _mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.int() - b.int()).abs().float().mean())


def test_every_path_draws_torchvisions_crop_and_flip():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    img = _photos()[0]
    ref, sampler = data.train_transform(96), CropSampler(96)
    for k in range(20):
        with seeded(k):
            want = ref(img)
        with seeded(k):
            c = sampler(*img.size)
        got = TF.resized_crop(img, c.top, c.left, c.height, c.width, [96, 96], interpolation=InterpolationMode.BICUBIC,
                              antialias=True)
        got = TF.horizontal_flip(got) if c.flip else got
        assert torch.equal(TF.pil_to_tensor(got), want), k


def test_crop_parameters_follow_random_resized_crop():
    """Area uniform in scale·(W·H) (checked where no draw is rejected), log aspect ratio uniform in
    log(3/4)..log(4/3), positions uniform, flips with probability hflip."""
    from scipy import stats

    sampler = CropSampler(64, scale=(0.2, 1.0), hflip=0.3)
    w_img = h_img = 1000
    with seeded(0):
        crops = [sampler(w_img, h_img) for _ in range(4000)]
    area = np.array([c.width * c.height for c in crops]) / (w_img * h_img)
    log_ratio = np.log([c.width / c.height for c in crops])
    assert area.min() >= 0.2 - 0.01 and area.max() <= 1.0
    low = area[area <= 0.7]
    assert stats.kstest((low - 0.2) / 0.5, "uniform").pvalue > 1e-3
    assert np.abs(log_ratio).max() <= math.log(4 / 3) + 0.01
    assert stats.kstest((log_ratio[area <= 0.7] - math.log(3 / 4)) / (2 * math.log(4 / 3)), "uniform").pvalue > 1e-3
    rel_top = np.array([c.top / (h_img - c.height) for c in crops if c.height < h_img])
    assert stats.kstest(rel_top, "uniform").pvalue > 1e-3
    assert abs(np.mean([c.flip for c in crops]) - 0.3) < 0.03


@pytest.mark.parametrize("size", [(640, 427), (1600, 1068)])
def test_cpu_and_gpu_paths_stay_within_a_level_of_the_reference(size):
    """Same crop parameters -> the faster CPU path and the GPU path (on the CPU device) match today's PIL path:
    mean |difference| in uint8 levels, measured when written: CPU path 0.02 (photo size) and up to 2.3 (a large
    photo, whose big crops it decodes at reduced size); GPU path at most 0.2."""
    for want, fast, dev in _crops(size):
        assert fast.shape == dev.shape == want.shape == (3, 224, 224)
        assert _mad(fast, want) <= (0.3 if size[0] < 1000 else 3.0)
        assert _mad(dev, want) <= 0.3


def _crops(size, gpu: bool = True):
    """(reference, cpu path, gpu path or None) of 8 seeded 224-px training crops of each photo resized to ``size``."""
    ref, cpu, dev = data.train_transform(224), TrainCrop(224), EncodedCrop(224)
    for img in _photos():
        jpg = _jpeg(img.resize(size))
        for k in range(8):
            with seeded(k):
                want = ref(data.open_image(jpg))
            with seeded(k):
                fast = cpu(jpg)
            if gpu:
                with seeded(k):
                    yield want, fast, EncodedBatch.of([dev(jpg)]).to("cpu")[0]
            else:
                yield want, fast, None


@pytest.mark.parametrize("size", [(1001, 667), (1599, 1063), (1601, 1067)])
def test_reduced_size_decoding_keeps_the_crop_where_the_size_does_not_divide(size):
    """The DCT-scaled decode (a crop of at least twice the output) scales the crop box by Pillow's exact 1/k, not by
    the rounded-up reduced size: before, these sizes were 2.2 levels off on average (a quarter pixel's shift)."""
    diffs = [_mad(fast, want) for want, fast, _ in _crops(size, gpu=False)]
    assert float(np.mean(diffs)) <= 1.5, diffs


def test_16_bit_and_float_images_are_scaled_faithfully_or_refused():
    grey = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    png = io.BytesIO()
    Image.fromarray(grey).save(png, "PNG")  # mode I;16
    assert Image.open(io.BytesIO(png.getvalue())).mode.startswith("I")
    rgb = np.asarray(data.open_image(png.getvalue()))
    assert rgb.shape == (48, 64, 3) and rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255
    assert abs(float(rgb[..., 0].mean()) - 127.5) < 1.5  # not 97 % white, as PIL's clipping convert gave
    with seeded(0):
        crop = TrainCrop(32)(png.getvalue())  # the cpu decode path converts the same way
    assert 60 < float(crop.float().mean()) < 200
    tif = io.BytesIO()
    Image.fromarray(np.linspace(0, 1, 64 * 48).reshape(48, 64).astype(np.float32), "F").save(tif, "TIFF")
    assert abs(float(np.asarray(data.open_image(tif.getvalue())).mean()) - 127.5) < 1.5
    bad = np.ones((8, 8), dtype=np.float32)
    bad[2, 3] = np.nan
    tif = io.BytesIO()
    Image.fromarray(bad, "F").save(tif, "TIFF")
    with pytest.raises(ValueError, match="NaN or infinite"):
        data.open_image(tif.getvalue())
    with pytest.raises(ValueError, match="NaN or infinite"), seeded(0):
        TrainCrop(8)(tif.getvalue())


def test_shards_of_float_tiffs_keep_their_values_and_skip_non_finite_ones(tmp_path):
    """hd data shards wrote a float TIFF as an all-black 8-bit PNG; now it is scaled as on every decode path."""
    for c in range(2):
        (tmp_path / "src" / f"c{c}").mkdir(parents=True)
        Image.fromarray(np.full((16, 16), 0.5 + 0.1 * c, dtype=np.float32), "F").save(tmp_path / "src" / f"c{c}" / "a.tif")
    bad = np.full((16, 16), 0.5, dtype=np.float32)
    bad[0, 0] = np.inf
    Image.fromarray(bad, "F").save(tmp_path / "src" / "c0" / "b.tif")
    info = data.write_shards(str(tmp_path / "src"), tmp_path / "wds", maxcount=10, splits=["train"])
    assert info["splits"]["train"]["num_samples"] == 2  # the infinite one skipped as unreadable
    loader = data.build_loader(tmp_path / "wds", img_size=16, batch_size=2, train=False, num_workers=0)
    x, _ = next(iter(loader))
    assert sorted(round(float(v)) for v in x.float().mean((1, 2, 3))) == [128, 153]  # 0.5 and 0.6 of 255


def test_non_jpeg_samples_are_cropped_on_the_cpu_and_counted_as_fallbacks():
    img = _photos()[1].resize((200, 150))
    png = io.BytesIO()
    img.save(png, "PNG")
    gpu = EncodedCrop(64)
    cmyk = _jpeg(img.convert("CMYK"))
    grey = _jpeg(img.convert("L"))
    items = []
    for raw in (png.getvalue(), cmyk, grey, _jpeg(img)):
        with seeded(1):
            items.append(gpu(raw))
    assert [e.crop is None for e in items] == [True, True, False, False]
    batch = EncodedBatch.of(items)
    assert batch.fallbacks == 2
    out = batch.to("cpu")
    assert out.shape == (4, 3, 64, 64) and out.dtype == torch.uint8
    ref = data.train_transform(64)
    with seeded(1):
        want = ref(img)
    assert _mad(out[0], want) <= 0.5 and _mad(out[3], want) <= 4.0  # PNG: the crop's border; JPEG: its q90 loss


def _mixed_folder(root) -> int:
    """2 classes of JPEG (RGB, grey, CMYK), PNG and one corrupt file each; returns the corrupt count."""
    photo = _photos()[0].resize((160, 120))
    for c in range(2):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(4):
            im = photo.rotate(30 * i + 90 * c)
            im.save(d / f"{i}.jpg", quality=90)
            im.convert("L").save(d / f"{i}g.jpg")
            im.convert("CMYK").save(d / f"{i}k.jpg")
            im.save(d / f"{i}.png")
        (d / "broken.jpg").write_bytes(_jpeg(photo)[:300])
    return 2


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_mixed_sources_decode_or_count_bad_alike_on_every_path(tmp_path, kind):
    bad = _mixed_folder(tmp_path / "imgs")
    source = str(tmp_path / "imgs")
    if kind == "shards":
        data.write_shards(source, tmp_path / "wds", maxcount=16, shuffle=False)
        source = str(tmp_path / "wds")
    out = {}
    for path in ("pil", "cpu", "gpu"):
        loader = data.build_loader(source, img_size=48, batch_size=8, num_workers=0, seed=0,
                                   transform=data.augment(48, decode=path), max_bad_fraction=0.5, train=False)
        batches = [(x.to("cpu") if isinstance(x, EncodedBatch) else x, y) for x, y in loader]
        out[path] = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]), loader.bad_samples,
                     loader.cpu_fallbacks)
    (ref, ref_y, ref_bad, _), (cpu, cpu_y, cpu_bad, _), (gpu, gpu_y, gpu_bad, fallbacks) = out.values()
    bad = bad if kind == "folder" else 0  # hd data shards leaves unreadable files out
    assert ref_bad == cpu_bad == gpu_bad == bad  # the corrupt files, and nothing else
    assert torch.equal(ref_y, cpu_y) and torch.equal(ref_y, gpu_y) and len(ref_y) == 34 - 2
    assert fallbacks == len(ref_y) // 2  # the PNG and CMYK halves went through the CPU
    assert _mad(cpu, ref) <= 1.0 and _mad(gpu, ref) <= 1.0


def test_truncated_corrupt_and_trailing_data_jpegs_on_the_gpu_path():
    """A truncated JPEG goes to the CPU path in the worker and fails there (counted as unreadable); one with data
    after its end marker decodes as on the other paths; one whose body is destroyed (markers intact) only fails
    on the device: it is decoded by PIL, or trained as black, and never stops the batch."""
    jpg = _jpeg(_photos()[0].resize((80, 60)))
    gpu = EncodedCrop(32)
    with pytest.raises(OSError):
        gpu(jpg[: len(jpg) // 2])
    trailing = gpu(jpg + b"motion photo or camera metadata" * 10)
    assert trailing.crop is None and trailing.data.shape == (3, 32, 32)  # cropped on the CPU, not refused
    good, broken = gpu(jpg), gpu(jpg)
    body = bytearray(broken.data)
    body[200:600] = b"\x07" * 400  # entropy-coded data destroyed, markers intact
    broken = dataclasses.replace(broken, data=bytes(body))
    out = EncodedBatch.of([good, broken]).to("cpu")
    assert out.shape == (2, 3, 32, 32) and torch.equal(out[0], EncodedBatch.of([good]).to("cpu")[0])
    dead = dataclasses.replace(good, data=b"\xff\xd8\xff\xd9")  # a JPEG with nothing in it
    out = EncodedBatch.of([good, dead]).to("cpu")
    assert out.shape == (2, 3, 32, 32) and int(out[1].max()) == 0


def test_a_gpu_batch_crosses_processes_as_two_tensors():
    """One shared-memory block per batch for the bytes and one for the CPU fallbacks, not one per sample (a
    file descriptor each: 8 workers x 256 images would exhaust the default limit)."""
    img = _photos()[0].resize((90, 60))
    png = io.BytesIO()
    img.save(png, "PNG")
    items = [EncodedCrop(32)(raw) for raw in (_jpeg(img), png.getvalue(), _jpeg(img, quality=70))]
    batch = EncodedBatch.of(items)
    tensors = [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]
    assert len(tensors) == 2 and batch.decoded.shape == (1, 3, 32, 32) and batch.fallbacks == 1
    assert batch.data.numel() == len(items[0].data) + len(items[2].data)


def test_gpu_path_splits_ranks_like_the_cpu_path():
    """2 ranks x batch b = 1 process x batch 2b on the gpu path too (the crop is drawn in the worker)."""
    def first(rank, world, b, path):
        loader = data.build_loader("demo", img_size=32, batch_size=b, num_workers=0, rank=rank, world_size=world,
                                   seed=0, transform=data.augment(32, decode=path))
        x, y = next(iter(loader))
        return (x.to("cpu") if isinstance(x, EncodedBatch) else x), y

    (a, ya), (b, yb), (whole, yw) = first(0, 2, 8, "gpu"), first(1, 2, 8, "gpu"), first(0, 1, 16, "gpu")
    assert torch.equal(torch.cat([a, b]), whole) and torch.equal(torch.cat([ya, yb]), yw)
    assert torch.equal(whole, first(0, 1, 16, "cpu")[0])  # arrays: the gpu path crops them on the CPU, identically


def test_gpu_path_resumes_mid_epoch_at_the_same_samples(tmp_path):
    _mixed_folder(tmp_path / "imgs")

    def batches(start):
        loader = data.build_loader(str(tmp_path / "imgs"), img_size=32, batch_size=4, num_workers=0, seed=5,
                                   transform=data.augment(32, decode="gpu"), max_bad_fraction=0.5)
        loader.set_epoch(1, start_batch=start)
        return [(x.to("cpu"), y) for x, y in loader]

    full, resumed = batches(0), batches(3)
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(full[3:], resumed, strict=True))


def test_decode_setting_resolves_and_rejects(tmp_path):
    (tmp_path / "a").mkdir()
    _photos()[0].save(tmp_path / "a" / "x.jpg")
    assert data.decode_path("auto", cuda=True, source=str(tmp_path)) == "gpu"
    assert data.decode_path("auto", cuda=False, source=str(tmp_path)) == "cpu"
    assert data.decode_path("pil", cuda=True) == "pil"
    assert data.decode_path("auto", cuda=True, source="demo") == "cpu"  # in-memory arrays: nothing to decode
    from hdcli.errors import HDError

    with pytest.raises(HDError, match="unknown data.decode 'nvjpeg'"):
        data.decode_path("nvjpeg", cuda=True)


def test_shards_with_max_side_hold_shrunk_jpegs_and_keep_small_images(tmp_path, hd):
    import tarfile

    photo = _photos()[0]  # 640 x 427
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    photo.save(tmp_path / "imgs" / "a" / "big.jpg", quality=95)
    photo.resize((150, 100)).save(tmp_path / "imgs" / "a" / "small.png")
    r = hd("data", "shards", str(tmp_path / "imgs"), str(tmp_path / "wds"), "--max-side", "256", "--quality", "85",
           "--no-shuffle")
    assert r.returncode == 0, r.stderr
    with tarfile.open(next((tmp_path / "wds").glob("train-*.tar"))) as tar:
        files = {m.name.rsplit(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers() if "cls" not in m.name}
    assert set(files) == {"jpg", "png"}
    assert Image.open(io.BytesIO(files["jpg"])).size == (384, 256)  # shorter side 427 -> 256, aspect kept
    assert Image.open(io.BytesIO(files["png"])).size == (150, 100)  # already small: kept as it was
    loader = data.build_loader(str(tmp_path / "wds"), img_size=64, batch_size=2, num_workers=0, train=False,
                               transform=data.augment(64, decode="gpu"))
    x, y = next(iter(loader))
    assert x.to("cpu").shape == (2, 3, 64, 64) and loader.cpu_fallbacks == 1
    r = hd("data", "shards", str(tmp_path / "imgs"), str(tmp_path / "w2"), "--max-side", "0")
    assert r.returncode == 2 and "--max-side must be at least 1" in r.stderr
