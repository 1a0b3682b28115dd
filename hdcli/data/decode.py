"""The training crop of METHOD.md three ways, all drawing the same random crop and flip per sample:

- ``pil``: torchvision's ``RandomResizedCrop`` + flip on the fully decoded image (the reference, as before);
- ``cpu``: the same crop and flip; JPEGs decoded by torchvision (libjpeg-turbo) and resized on the uint8
  tensor, or decoded by PIL at reduced size when the crop has at least twice the output size (``Image.draft``,
  DCT scaling); other images cropped and resized in one PIL call (``resize(box=...)``);
- ``gpu``: the workers only read the file and draw the crop; the device decodes the batch
  (``torchvision.io.decode_jpeg(device=...)``, nvJPEG on CUDA), crops, resizes (bicubic, antialiased) and
  flips. Samples that are not plain RGB/greyscale JPEGs (PNG, WebP, CMYK, ...) are decoded on the CPU by the
  ``cpu`` path in the worker, and counted. The same code runs with ``device="cpu"`` (what the tests use).

What differs between them is measured in tests/test_decode.py and stated in docs/data.md.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from hdcli.config.schema import DECODE  # one list of the paths: the config's
from hdcli.data.source import parse_source
from hdcli.data.transforms import to_rgb, train_transform
from hdcli.errors import HDError


def decode_jpeg(data, device: str | torch.device = "cpu"):
    """``torchvision.io.decode_jpeg(data, mode=RGB, device=device)`` (one tensor of bytes or a list: batched,
    nvJPEG on CUDA). torchvision 0.29 deprecates its decoders in favour of TorchCodec, which our machines do not
    have; decode_jpeg is still the batched nvJPEG decoder it ships, so the notice is silenced here."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as tv_decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        return tv_decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


@dataclass(frozen=True)
class Crop:
    """One sample's crop in the original image's pixels and its flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


class CropSampler:
    """Draws crops exactly as ``v2.RandomResizedCrop(size, scale)`` then ``v2.RandomHorizontalFlip(hflip)`` do,
    from torch's global RNG (seeded per sample by the loaders): the same draws in the same order, so every path
    crops the same region of a sample."""

    def __init__(self, img_size: int, scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5):
        from torchvision.transforms import InterpolationMode, v2

        self.img_size, self.hflip = int(img_size), float(hflip)
        self.rrc = v2.RandomResizedCrop(img_size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True)

    def __call__(self, width: int, height: int) -> Crop:
        p = self.rrc.make_params([_Size(width, height)])
        flip = bool(torch.rand(1) < self.hflip)  # RandomHorizontalFlip: not applied when rand >= p
        return Crop(p["top"], p["left"], p["height"], p["width"], flip)


class _Size(Image.Image):
    """What ``make_params`` needs of an image: its size (torchvision's ``query_size`` reads PIL's ``.size``)."""

    def __init__(self, width: int, height: int):
        super().__init__()
        self._size = (width, height)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, S, S]


class TrainCrop:
    """The ``cpu`` path (see the module docstring): encoded bytes (or a decoded PIL image) -> uint8 [3, S, S].

    A plain RGB/greyscale JPEG is decoded by torchvision (libjpeg-turbo) and cropped and resized on the uint8
    tensor (torch's antialiased bicubic, PIL's filter); when the crop has at least twice the output size in
    pixels it is decoded by PIL at reduced size instead (``draft``: DCT scaling by 1/2 .. 1/8, the crop keeping
    at least S px). Anything else goes through PIL: one ``resize(box=...)`` call for crop and resize.
    ``raw = True`` tells the loaders to hand over the file's bytes (``Records.raw``).
    """

    raw = True

    def __init__(self, img_size: int, *, scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5,
                 draft: bool = True):
        self.sampler = CropSampler(img_size, scale, hflip)
        self.size, self.draft = int(img_size), draft

    def __call__(self, data: bytes | Image.Image) -> torch.Tensor:
        img = Image.open(io.BytesIO(data)) if isinstance(data, bytes | bytearray) else data  # header only
        return self.apply(data, img, self.sampler(*img.size))

    def apply(self, data: bytes | Image.Image, img: Image.Image, c: Crop) -> torch.Tensor:
        """The crop ``c`` of a sample (``data``: its bytes or a decoded image; ``img``: it opened, header only)."""
        big = self.draft and min(c.width, c.height) >= 2 * self.size
        if img is not data and img.format == "JPEG" and img.mode in ("RGB", "L") and not big:
            x = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            return crop_resize(x, c, self.size)
        return self.pil(img, c)

    def pil(self, img: Image.Image, c: Crop) -> torch.Tensor:
        """Crop ``c`` of a PIL image (opened lazily: a JPEG is decoded at reduced size where the crop allows)."""
        width, height = img.size
        s = self.size
        fx = fy = 1.0
        if self.draft and img.format == "JPEG" and min(c.width, c.height) >= 2 * s:
            drafted = img.draft("RGB", (math.ceil(width * s / c.width), math.ceil(height * s / c.height)))
            if drafted is not None:  # the original image's extent in the reduced one: the exact DCT scale 1/k
                fx, fy = drafted[1][2] / width, drafted[1][3] / height  # (not the rounded-up reduced size)
        img = to_rgb(img)  # decodes (a truncated file raises here)
        box = (c.left * fx, c.top * fy, (c.left + c.width) * fx, (c.top + c.height) * fy)
        out = img.resize((s, s), Image.Resampling.BICUBIC, box=box)
        if c.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_tensor(out)


# ---------------------------------------------------------------- the gpu path

@dataclass
class Encoded:
    """A sample for the device (made in a worker): its JPEG bytes and crop, or an image the worker cropped itself
    (CPU fallback: ``crop`` None, ``data`` uint8 [3, S, S])."""

    data: bytes | torch.Tensor
    crop: Crop | None
    size: int  # S, the output size


class EncodedCrop:
    """The ``gpu`` path in the workers: read the header, draw the crop; plain JPEGs go to the device as bytes,
    anything else is cropped here by the ``cpu`` path (also a JPEG that does not end in its end-of-image marker:
    trailing metadata decodes there, a truncated file fails there and is counted as unreadable). Takes encoded
    bytes (``raw = True``)."""

    raw = True

    def __init__(self, img_size: int, *, scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5):
        self.cpu = TrainCrop(img_size, scale=scale, hflip=hflip)
        self.size = int(img_size)

    def __call__(self, data: bytes | Image.Image) -> Encoded:
        if not isinstance(data, bytes | bytearray):  # decoded already (in-memory arrays)
            return Encoded(self.cpu(data), None, self.size)
        img = Image.open(io.BytesIO(data))  # header only
        c = self.cpu.sampler(*img.size)
        plain = img.format == "JPEG" and img.mode in ("RGB", "L")  # what nvJPEG decodes to RGB
        if plain and data.rstrip(b"\0").endswith(b"\xff\xd9"):
            return Encoded(bytes(data), c, self.size)
        return Encoded(self.cpu.pil(img, c), None, self.size)


@dataclass
class EncodedBatch:
    """A batch of the gpu path, made by the worker's collate (``of``) as two tensors, so that one batch crosses
    to the main process as two shared-memory blocks, not one per sample: ``data`` all JPEG bytes concatenated
    (``bounds`` per sample), ``decoded`` the CPU fallbacks stacked, ``crops`` (None for a fallback).
    ``.to(device)`` decodes it there -> uint8 [B, 3, S, S], what the other paths give."""

    data: torch.Tensor  # uint8 [total bytes]
    bounds: list[tuple[int, int]]  # (start, end) in data per sample; (0, 0) for a fallback
    crops: list[Crop | None]
    decoded: torch.Tensor  # uint8 [fallbacks, 3, S, S]
    size: int

    dtype = torch.uint8

    @classmethod
    def of(cls, items: list[Encoded], size: int | None = None) -> EncodedBatch:
        size = items[0].size if items else int(size or 0)
        jpegs = [e.data for e in items if e.crop is not None]
        bounds, at = [], 0
        for e in items:
            n = len(e.data) if e.crop is not None else 0
            bounds.append((at, at + n))
            at += n
        data = torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8) if at else torch.empty(0, dtype=torch.uint8)
        fallbacks = [e.data for e in items if e.crop is None]
        decoded = torch.stack(fallbacks) if fallbacks else torch.empty(0, 3, size, size, dtype=torch.uint8)
        return cls(data, bounds, [e.crop for e in items], decoded, size)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The decoded batch's shape [B, 3, S, S]."""
        return (len(self.crops), 3, self.size, self.size)

    @property
    def fallbacks(self) -> int:
        return len(self.decoded)

    def __len__(self) -> int:
        return len(self.crops)

    def to(self, device, non_blocking: bool = False) -> torch.Tensor:
        return decode_batch(self, torch.device(device))

    def pin_memory(self) -> EncodedBatch:
        self.decoded = self.decoded.pin_memory()
        return self

    def is_pinned(self) -> bool:
        return True


def decode_batch(batch: EncodedBatch, device: torch.device) -> torch.Tensor:
    """Decode, crop, resize (bicubic, antialiased, as PIL) and flip a batch on ``device`` -> uint8 [B, 3, S, S]."""
    size = batch.size
    out = torch.empty(len(batch), 3, size, size, dtype=torch.uint8, device=device)
    jpegs = [i for i, c in enumerate(batch.crops) if c is not None]
    fallbacks = [i for i, c in enumerate(batch.crops) if c is None]
    if fallbacks:
        out[fallbacks] = batch.decoded.to(device, non_blocking=True)
    if jpegs:
        views = [batch.data[batch.bounds[i][0]:batch.bounds[i][1]] for i in jpegs]
        try:
            decoded = decode_jpeg(views, device=device)
        except RuntimeError:  # a corrupt file the header check let through: decode the rest one by one
            decoded = [_decode_one(v, device) for v in views]
        for i, img in zip(jpegs, decoded, strict=True):
            if img is None:
                out[i].zero_()
            else:
                out[i] = crop_resize(img, batch.crops[i], size)
    return out


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """One JPEG on ``device``, else by PIL on the CPU; None (trained as black, with a warning) when neither can:
    the workers count unreadable files, this one only showed on the device."""
    try:
        return decode_jpeg(data, device=device)
    except RuntimeError:
        try:
            return _to_tensor(Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB")).to(device)
        except Exception as e:  # noqa: BLE001
            from hdcli import ui

            ui.warn(f"a JPEG of the batch could not be decoded on {device} nor by PIL ({e}): it is trained as black")
            return None


def crop_resize(img: torch.Tensor, c: Crop, size: int) -> torch.Tensor:
    """uint8 [3, H, W] -> the crop resized to uint8 [3, S, S] (bicubic, antialiased: torchvision's resize, on the
    CPU torch's uint8 kernel that matches PIL's filter), flipped."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    x = TF.resize(img[:, c.top:c.top + c.height, c.left:c.left + c.width], [size, size],
                  interpolation=InterpolationMode.BICUBIC, antialias=True)
    return x.flip(-1) if c.flip else x


def decode_path(decode: str, cuda: bool, source=None) -> str:
    """``data.decode`` resolved: ``auto`` is ``gpu`` when the batches go to a CUDA device and the source holds
    files (folders, shards), else ``cpu`` (the built-in sets are in-memory arrays: nothing to decode)."""
    if decode not in DECODE:
        raise HDError(f"unknown data.decode {decode!r}", f"choose one of {', '.join(DECODE)}")
    if decode == "auto":
        return "gpu" if cuda and parse_source(source).kind in ("folder", "shards") else "cpu"
    return decode


def augment(img_size: int, *, scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5, decode: str = "cpu"):
    """METHOD.md's augmentation by the decode path ``decode`` (``cpu``, ``pil`` or ``gpu``; hdcli.data.decode)."""
    if decode == "gpu":
        return EncodedCrop(img_size, scale=scale, hflip=hflip)
    if decode == "cpu":
        return TrainCrop(img_size, scale=scale, hflip=hflip)
    return train_transform(img_size, scale=scale, hflip=hflip)
