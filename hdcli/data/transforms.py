"""Per-image transforms and the device-side normalisation: METHOD.md's augmentation, the eval crop, decoding.

The data contract: a transform turns a PIL RGB image into uint8 [3, S, S]; the consumer moves a batch to
its device and calls :func:`normalize` there (DESIGN.md data flow).
"""
from __future__ import annotations

import io
import os
from functools import lru_cache

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
    """Decode fully (so truncation shows here, not later) and convert to RGB."""
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes | bytearray) else data)
    img.load()
    return img.convert("RGB")



