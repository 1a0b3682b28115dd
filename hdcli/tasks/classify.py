"""The supervised-classification pieces shared by ``hd finetune`` and ``hd pretrain supervised``.

As in timm's training script with its prefetcher, the per-image augmentation (RandomResizedCrop, flip,
RandAugment) runs in the data workers and yields uint8 images (the data contract); the batch is
normalised, randomly erased and mixed on the device (:class:`ClassifyStep`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from hdcli import data
from hdcli.errors import HDError


class _SeedNumpy:
    """Seed numpy's global RNG from python's, which ``hdcli.data`` seeds per sample: timm's RandAugment
    picks its ops with ``np.random``, and this keeps every image's augmentation a function of
    (seed, epoch, position) as hdcli.data promises."""

    def __call__(self, img):
        import random

        np.random.seed(random.getrandbits(32))
        return img


def train_transform(img_size: int, *, scale, hflip: float, auto_augment: str | None, color_jitter=0.4,
                    key: str = "auto_augment", examples: str = "rand-m9-mstd0.5-inc1, original, or none"):
    """timm's ``create_transform`` for training (RandomResizedCrop, flip, RandAugment), uint8 output; random
    erasing runs on the device after normalisation. ``color_jitter``: timm's default (used only without
    RandAugment). ``key`` names the setting in errors."""
    from timm.data import create_transform
    from torchvision import transforms

    try:
        t = create_transform(img_size, is_training=True, scale=tuple(scale), hflip=hflip, color_jitter=color_jitter,
                             auto_augment=auto_augment, interpolation="bicubic", mean=data.IMAGENET_MEAN,
                             std=data.IMAGENET_STD, use_prefetcher=True)
    except (AssertionError, KeyError, ValueError) as e:
        raise HDError(f"timm rejects {key} {auto_augment!r}: {e or type(e).__name__}", f"e.g. {examples}") from None
    _posterize_compat(t)
    return transforms.Compose([_SeedNumpy(), t])


def _posterize_zero_bits(img, bits_to_keep, **kw):
    """timm's posterize, also for 0 bits: Pillow ≥ 11 refuses ``ImageOps.posterize(img, 0)``, which older
    Pillow (that timm's RandAugment was written for) turned into a black image."""
    from timm.data import auto_augment

    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return auto_augment.posterize(img, bits_to_keep, **kw)


def _posterize_compat(transform) -> None:
    """Point the posterize ops of timm's RandAugment/AugMix/AutoAugment inside ``transform`` at
    :func:`_posterize_zero_bits` (rand-m9-mstd0.5-inc1 reaches magnitude 10 = 0 bits kept)."""
    from timm.data import auto_augment

    for t in getattr(transform, "transforms", [transform]):
        ops = list(getattr(t, "ops", []))
        for sub in getattr(t, "policy", []):
            ops.extend(sub)
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize_zero_bits


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the top-k logits, for each k (k capped at the class count).

    logits [B, K], labels [B] -> float [len(ks)].
    """
    ks = [min(k, logits.shape[1]) for k in ks]
    top = logits.topk(max(ks), dim=1).indices  # [B, kmax], best first
    hit = top == labels[:, None]  # [B, kmax]
    return torch.stack([hit[:, :k].any(dim=1).sum() for k in ks]).float()  # [len(ks)]


class ClassifyStep:
    """The loss of one supervised batch on its device: normalise (ImageNet statistics), random erasing, Mixup/
    CutMix, then the cross-entropy (soft targets when mixing; label smoothing otherwise). timm's modules,
    built on the first batch's device (MAE main_finetune.py, DeiT)."""

    def __init__(self, num_classes: int, *, mixup: float = 0.0, cutmix: float = 0.0, cutmix_minmax=None,
                 mixup_prob: float = 1.0, mixup_switch_prob: float = 0.5, mixup_mode: str = "batch",
                 smoothing: float = 0.0, reprob: float = 0.0, remode: str = "pixel", recount: int = 1):
        self.num_classes = num_classes
        self.mix = dict(mixup_alpha=mixup, cutmix_alpha=cutmix, cutmix_minmax=tuple(cutmix_minmax) if cutmix_minmax
                        else None, prob=mixup_prob, switch_prob=mixup_switch_prob, mode=mixup_mode)
        self.mixing = mixup > 0 or cutmix > 0 or cutmix_minmax is not None
        self.smoothing, self.reprob, self.remode, self.recount = smoothing, reprob, remode, recount
        self._mixup = self._erase = self._criterion = None

    def _setup(self, device: torch.device) -> None:
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        if self.mixing:
            self._mixup = Mixup(**self.mix, label_smoothing=self.smoothing, num_classes=self.num_classes)
            self._criterion = SoftTargetCrossEntropy()
        elif self.smoothing > 0:
            self._criterion = LabelSmoothingCrossEntropy(smoothing=self.smoothing)
        else:
            self._criterion = nn.CrossEntropyLoss()
        if self.reprob > 0:
            self._erase = RandomErasing(self.reprob, mode=self.remode, max_count=self.recount, device=device)

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self._criterion is None:
            self._setup(images.device)
        x = data.normalize(images)  # uint8 -> float on the device
        if self._erase is not None:
            x = self._erase(x)
        if self._mixup is not None:
            if len(x) % 2:  # Mixup pairs the batch with its flip; an odd batch (a skipped bad image) loses one
                x, labels = x[:-1], labels[:-1]
            x, labels = self._mixup(x, labels)
        return self._criterion(model(x), labels)
