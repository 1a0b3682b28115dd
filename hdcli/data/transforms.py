"""Per-image transforms and the device-side normalisation: METHOD.md's augmentation, the eval crop, decoding.

The data contract: a transform turns a PIL RGB image into uint8 [3, S, S]; the consumer moves a batch to
its device and calls :func:`normalize` there (DESIGN.md data flow).
"""
from __future__ import annotations

import io
import os
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from hdcli.teachers.registry import STATS

IMAGENET_MEAN, IMAGENET_STD = STATS["imagenet"]  # what every student is trained on (METHOD.md)

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
    """Decode fully (so truncation shows here, not later) and convert to RGB (:func:`to_rgb`)."""
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes | bytearray) else data)
    img.load()
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """An image as 8-bit RGB, faithfully: 16-bit greys (``I;16``, ``I`` up to 65535) scaled by >> 8 (PIL's own
    ``convert`` would clip them, leaving a white image); 32-bit floats in [0, 1] or [0, 255] scaled to 0..255. A
    float image with NaN/inf or values outside those ranges, or a 32-bit integer one beyond 16 bits, cannot be
    converted faithfully: ValueError (the loaders count it as an unreadable image, never train on it)."""
    if img.mode in ("RGB",):
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise ValueError(f"a {img.mode} image with values {a.min()}..{a.max()}: not a 16-bit image")
        return Image.fromarray((a >> 8).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError("a float image with NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"a float image with values {lo:.3g}..{hi:.3g}: neither in [0, 1] nor in [0, 255]")
        scale = 255.0 if hi <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")



