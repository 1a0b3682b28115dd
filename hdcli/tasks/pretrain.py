"""Pre-training of teachers from scratch, as ``Task``s for the one engine loop: ``hd pretrain mae|supervised``.

    from hdcli.tasks import pretrain
    cfg = pretrain.load_config("mae", overrides={"train.steps": 300, "data.img_size": 32, ...})
    pretrain.pretrain(cfg, "runs/mae-tiny")      # -> <run>/student/ (timm save_for_hf layout)

- ``mae`` (He et al., ``models_mae.py``): random masking of ``mask_ratio`` of the patches per image,
  the timm ViT encoder runs on CLS + visible patches only, a light decoder (timm ``Block``s on
  mask tokens + fixed 2-D sin-cos positions) predicts the pixels of every patch, and the loss is the
  MSE on the masked patches of per-patch normalised pixels (``norm_pix_loss``).
- ``supervised`` (DeiT-style): cross-entropy with label smoothing on timm's training transform
  (RandomResizedCrop, flip, RandAugment), optional Mixup/CutMix and random erasing on the device.

Both export the encoder (no MAE decoder, no classifier) into
``<run>/student`` with ``save_for_hf`` and the ImageNet mean/std the images were normalised with, so
``local-dir:<run>/student`` works as a teacher (``hd distill --teachers local-dir:A,local-dir:B``),
as a student for ``hd finetune`` and for ``hd analyze``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hdcli import config, data
from hdcli.config import DataConfig, OptimConfig, StudentConfig, TrainConfig
from hdcli.errors import HDError
from hdcli.train.task import Task

MODES = ("mae", "supervised")


# ---------------------------------------------------------------- configuration

@dataclass
class PretrainSection:
    """``[pretrain]``: the objective. MAE defaults: He et al. (mask 75 %, decoder 8 × 512, norm_pix_loss);
    supervised defaults: DeiT (label smoothing 0.1, Mixup 0.8, CutMix 1.0, RandAugment, erasing 0.25)."""

    mode: str = "mae"  # mae | supervised
    # mae
    mask_ratio: float = 0.75  # fraction of patches hidden from the encoder
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True  # target = pixels normalised per patch (MAE's better setting)
    # supervised
    num_classes: int | None = None  # default: from the data
    smoothing: float = 0.1
    mixup: float = 0.8  # Mixup alpha (0: off)
    cutmix: float = 1.0  # CutMix alpha (0: off)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec ('none': off)
    reprob: float = 0.25  # random erasing probability

    def validate(self) -> None:
        config._choice(self.mode, MODES, "pretrain.mode")
        if not 0 < self.mask_ratio < 1:
            raise HDError(f"pretrain.mask_ratio must lie in (0, 1), got {self.mask_ratio}")
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            if getattr(self, name) < 1:
                raise HDError(f"pretrain.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.decoder_dim % self.decoder_heads:
            raise HDError(f"pretrain.decoder_dim ({self.decoder_dim}) must be divisible by pretrain.decoder_heads "
                          f"({self.decoder_heads})")
        if not 0 <= self.smoothing < 1:
            raise HDError(f"pretrain.smoothing must lie in [0, 1), got {self.smoothing}")
        if self.mixup < 0 or self.cutmix < 0:
            raise HDError(f"pretrain.mixup and pretrain.cutmix are Beta alphas ≥ 0, got {self.mixup}, {self.cutmix}")
        if not 0 <= self.reprob <= 1:
            raise HDError(f"pretrain.reprob is a probability, got {self.reprob}")
        if self.num_classes is not None and self.num_classes < 1:
            raise HDError(f"pretrain.num_classes must be ≥ 1, got {self.num_classes}")


@dataclass
class PretrainConfig:
    """``hd pretrain``: every setting of a run. Defaults = MAE's ViT-B recipe (800 epochs, blr 1.5e-4,
    warm-up 40, betas (0.9, 0.95), wd 0.05, RandomResizedCrop (0.2, 1)); ``supervised_defaults`` holds
    DeiT's changes."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=800))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(clip_grad=None))
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=lambda: StudentConfig(drop_path=0.0))
    pretrain: PretrainSection = field(default_factory=PretrainSection)

    def validate(self) -> None:
        p = self.pretrain
        if p.mode == "supervised" and (p.mixup > 0 or p.cutmix > 0) and self.train.batch_size % 2:
            raise HDError(f"Mixup/CutMix needs an even batch size, got {self.train.batch_size}",
                          "use an even --batch-size or set pretrain.mixup=0 and pretrain.cutmix=0")


# DeiT (Touvron et al. 2021): 300 epochs, lr 5e-4 × batch/512, warm-up 5, wd 0.05, drop path 0.1,
# crop scale (0.08, 1). Applied under the recipe and the flags for ``mode = "supervised"``.
SUPERVISED_DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {"epochs": 300},
    "optim": {"blr": 2.5e-4, "betas": [0.9, 0.999], "warmup_epochs": 5.0, "min_lr": 1e-5},
    "data": {"scale": [0.08, 1.0]},
    "student": {"drop_path": 0.1},
}


def load_config(mode: str, recipe: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                base: str | os.PathLike | None = None) -> PretrainConfig:
    """Defaults <- supervised defaults (mode supervised) <- ``base`` <- recipe <- overrides; validated."""
    config._choice(mode, MODES, "pretrain mode")
    cfg = PretrainConfig()
    if mode == "supervised":
        config.merge(cfg, SUPERVISED_DEFAULTS, "the supervised defaults")
    cfg.pretrain.mode = mode
    if base is not None:
        config.merge(cfg, config.read_toml(base), str(base))
    if recipe is not None:
        config.merge(cfg, config.read_toml(recipe), str(recipe))
    config.apply_overrides(cfg, {**(overrides or {}), "pretrain.mode": mode})
    config.validate(cfg)
    return cfg


# ---------------------------------------------------------------- pure pieces (MAE)

def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """images [B, C, H, W] -> patches [B, N, p·p·C] in row-major patch order (MAE's layout: p, p, C)."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)  # [B, C, gh, p, gw, p]
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, gh, gw, p, p, C]
    return x.reshape(b, gh * gw, patch * patch * c)  # [B, N, p·p·C]


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, N, p·p·C] -> [B, C, gh·p, gw·p]."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)  # [B, gh, gw, p, p, C]
    x = x.permute(0, 5, 1, 3, 2, 4)  # [B, C, gh, p, gw, p]
    return x.reshape(b, channels, gh * patch, gw * patch)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's norm_pix_loss target: each patch to zero mean, unit variance (unbiased var, as MAE).

    patches [B, N, P] -> [B, N, P]."""
    mean = patches.mean(dim=-1, keepdim=True)  # [B, N, 1]
    var = patches.var(dim=-1, keepdim=True)  # [B, N, 1]
    return (patches - mean) / (var + eps).sqrt()


def random_keep(noise: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's random_masking on given uniform noise: keep the ``N·(1−ratio)`` patches of smallest noise.

    noise [B, N] -> keep [B, n] (patch indices, ascending), mask [B, N] (1 = hidden, 0 = visible)."""
    b, n = noise.shape
    n_keep = max(1, int(n * (1 - mask_ratio)))
    keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values  # [B, n]
    mask = torch.ones(b, n, device=noise.device)
    mask.scatter_(1, keep, 0.0)  # [B, N]
    return keep, mask


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over hidden patches of the per-patch mean squared error. pred, target [B, N, P], mask [B, N]."""
    per_patch = (pred - target).pow(2).mean(dim=-1)  # [B, N]
    return (per_patch * mask).sum() / mask.sum().clamp_min(1)


# ---------------------------------------------------------------- models

class MaskedAutoencoder(nn.Module):
    """A timm ViT ``encoder`` plus MAE's light decoder. ``forward(images) -> (loss, pred [B,N,P], mask [B,N])``."""

    def __init__(self, encoder: nn.Module, *, mask_ratio: float = 0.75, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, norm_pix_loss: bool = True):
        super().__init__()
        from timm.layers import trunc_normal_
        from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
        from timm.models.vision_transformer import Block

        from hdcli.models import vit

        vit.check_vit(encoder, "the MAE encoder")
        p = vit.patch_size(encoder)
        if p[0] != p[1]:
            raise HDError(f"MAE pre-training needs square patches, got {p}")
        self.encoder = encoder
        self.patch = p[0]
        self.grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        n = self.grid[0] * self.grid[1]
        self.decoder_embed = nn.Linear(vit.width(encoder), decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        pos = build_sincos2d_pos_embed(list(self.grid), decoder_dim)  # [N, Dd], fixed (MAE)
        self.register_buffer("decoder_pos_embed", torch.cat([torch.zeros(1, decoder_dim), pos.reshape(n, -1)])[None],
                             persistent=False)  # [1, 1+N, Dd], CLS slot zero
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * 3)
        trunc_normal_(self.mask_token, std=0.02)
        for m in (self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor):
        from hdcli.models import vit

        b = images.shape[0]
        n = self.grid[0] * self.grid[1]
        keep, mask = random_keep(torch.rand(b, n, device=images.device), self.mask_ratio)  # [B, n], [B, N]
        x = vit.embed_kept(self.encoder, images, keep)  # [B, 1+n, D]: CLS + visible patches
        x = self.encoder.norm(self.encoder.blocks(x))  # [B, 1+n, D]
        y = self.decoder_embed(x)  # [B, 1+n, Dd]
        full = self.mask_token.to(y.dtype).expand(b, n, -1).clone()  # [B, N, Dd]
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, y.shape[-1]), y[:, 1:])  # visible back in place
        y = torch.cat([y[:, :1], full], dim=1) + self.decoder_pos_embed  # [B, 1+N, Dd]
        for blk in self.decoder_blocks:
            y = blk(y)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]  # [B, N, p·p·3]
        target = patchify(images, self.patch)  # [B, N, p·p·3]
        if self.norm_pix_loss:
            target = normalize_patches(target)
        return masked_mse(pred.float(), target.float(), mask), pred, mask


def build_encoder(cfg: PretrainConfig, num_classes: int = 0) -> nn.Module:
    from hdcli import teachers

    s = cfg.student
    return teachers.create(s.arch, pretrained=False, num_classes=num_classes, img_size=cfg.data.img_size,
                           patch_size=s.patch_size, drop_path_rate=s.drop_path, **s.kwargs)


def data_config(cfg: PretrainConfig) -> dict:
    """Preprocessing written into the exported config.json: the statistics the images were normalised with."""
    s = cfg.data.img_size
    return {"input_size": (3, s, s), "interpolation": "bicubic", "mean": data.IMAGENET_MEAN,
            "std": data.IMAGENET_STD, "crop_pct": 1.0}


# ---------------------------------------------------------------- tasks

class MAETask(Task):
    """``hd pretrain mae``: trains encoder + decoder; exports the encoder alone."""

    log_keys = ("loss",)

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        data.parse_source(cfg.data.source)
        p = cfg.pretrain
        self.model = MaskedAutoencoder(build_encoder(cfg), mask_ratio=p.mask_ratio, decoder_dim=p.decoder_dim,
                                       decoder_depth=p.decoder_depth, decoder_heads=p.decoder_heads,
                                       norm_pix_loss=p.norm_pix_loss)

    def train_loader(self, *, rank: int, world_size: int, seed: int):
        return data.augmented_loader(self.cfg.data, self.cfg.train.batch_size, rank=rank,
                                     world_size=world_size, seed=seed)

    def loss(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        loss, _, _ = model(data.normalize(batch[0]))
        return {"loss": loss}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        from timm.models import save_for_hf

        save_for_hf(model.encoder, str(out_dir), data_config=data_config(self.cfg), safe_serialization=True)


class SupervisedTask(Task):
    """``hd pretrain supervised``: a timm ViT classifier trained with cross-entropy; exported with its head."""

    log_keys = ("loss",)

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        p = cfg.pretrain
        src = data.parse_source(cfg.data.source)
        if src.kind in ("cifar100", "fashion-mnist"):
            data.open_records(src, "train")  # missing files fail before any model is built
        self.num_classes = p.num_classes or data.num_classes(cfg.data.source)
        self.model = build_encoder(cfg, num_classes=self.num_classes)
        self.transform = self._transform()
        self._mixup = self._erase = self._criterion = None

    def _transform(self):
        from timm.data import create_transform
        from torchvision import transforms

        from hdcli.tasks.finetune import _posterize_compat, _SeedNumpy

        d, p = self.cfg.data, self.cfg.pretrain
        try:
            t = create_transform(d.img_size, is_training=True, scale=tuple(d.scale), hflip=d.hflip,
                                 auto_augment=p.auto_augment, interpolation="bicubic", use_prefetcher=True)
        except (AssertionError, KeyError, ValueError) as e:
            raise HDError(f"timm rejects pretrain.auto_augment {p.auto_augment!r}: {e or type(e).__name__}",
                          "e.g. rand-m9-mstd0.5-inc1 (DeiT), original, or none") from None
        _posterize_compat(t)
        return transforms.Compose([_SeedNumpy(), t])  # per-image augmentation a function of (seed, epoch, position)

    def train_loader(self, *, rank: int, world_size: int, seed: int):
        d = self.cfg.data
        return data.build_loader(
            d.source, split="train", img_size=d.img_size, batch_size=self.cfg.train.batch_size, train=True,
            num_workers=d.num_workers, rank=rank, world_size=world_size, seed=seed, transform=self.transform,
            epoch_steps=d.epoch_steps, max_bad_fraction=d.max_bad_fraction)

    def loss(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        images, labels = batch
        if self._criterion is None:
            self._setup(images.device)
        x = data.normalize(images)
        if self._erase is not None:
            x = self._erase(x)
        if self._mixup is not None:
            if len(x) % 2:
                x, labels = x[:-1], labels[:-1]
            x, labels = self._mixup(x, labels)
        return {"loss": self._criterion(model(x), labels)}

    def _setup(self, device: torch.device) -> None:
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing
        from timm.loss import SoftTargetCrossEntropy

        p = self.cfg.pretrain
        if p.mixup > 0 or p.cutmix > 0:
            self._mixup = Mixup(mixup_alpha=p.mixup, cutmix_alpha=p.cutmix, label_smoothing=p.smoothing,
                                num_classes=self.num_classes)
            self._criterion = SoftTargetCrossEntropy()
        else:
            self._criterion = lambda logits, y: F.cross_entropy(logits, y, label_smoothing=p.smoothing)
        if p.reprob > 0:
            self._erase = RandomErasing(p.reprob, mode="pixel", device=device)

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """The encoder without its classifier, as MAE's and distilled students are: one layout for teachers,
        ``hd finetune`` (which adds its own head and pooling) and ``hd analyze``."""
        import copy

        from timm.models import save_for_hf

        encoder = copy.deepcopy(model)
        encoder.reset_classifier(0)
        save_for_hf(encoder, str(out_dir), data_config=data_config(self.cfg), safe_serialization=True)


def make_task(cfg: PretrainConfig) -> Task:
    return MAETask(cfg) if cfg.pretrain.mode == "mae" else SupervisedTask(cfg)


def pretrain(cfg: PretrainConfig, run_dir: str | os.PathLike, *, resume: str | None = None,
             resume_hint: str | None = None) -> dict:
    """Train ``cfg`` with the engine into ``run_dir``; returns the engine's summary (``student``: the export)."""
    from hdcli.train import engine

    data.parse_source(cfg.data.source)  # a wrong path fails before any run dir exists
    return engine.train(lambda: make_task(cfg), cfg, run_dir, resume=resume, resume_hint=resume_hint)
