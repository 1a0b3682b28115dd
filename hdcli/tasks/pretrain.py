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
from pathlib import Path

import torch
from torch import nn

from hdcli import config, data, ui
from hdcli.config import PretrainConfig
from hdcli.errors import HDError
from hdcli.method import masking
from hdcli.tasks import classify
from hdcli.train.task import Task

load_config = config.load_pretrain  # defaults <- supervised preset <- base <- recipe <- flags (hdcli.config)


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
    """MAE's random_masking on given uniform noise: keep the ``int(N·(1−ratio))`` patches of smallest noise (MAE
    truncates; the distillation's keep counts round, METHOD.md) with :func:`hdcli.method.masking.random_keep`.

    noise [B, N] -> keep [B, n] (patch indices, ascending), mask [B, N] (1 = hidden, 0 = visible)."""
    b, n = noise.shape
    keep = masking.random_keep(noise, max(1, int(n * (1 - mask_ratio))))  # [B, n]
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
        self.prefix = vit.num_prefix(encoder)  # CLS and register tokens go through the decoder too (MAE)
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        n = self.grid[0] * self.grid[1]
        self.decoder_embed = nn.Linear(vit.width(encoder), decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        pos = build_sincos2d_pos_embed(list(self.grid), decoder_dim)  # [N, Dd], fixed (MAE)
        self.register_buffer("decoder_pos_embed",
                             torch.cat([torch.zeros(self.prefix, decoder_dim), pos.reshape(n, -1)])[None],
                             persistent=False)  # [1, P+N, Dd], prefix slots zero
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
        p = self.prefix
        x, rope = vit.embed_kept(self.encoder, images, keep)  # [B, P+n, D]: prefix + visible patches
        x = vit.run_blocks(self.encoder, x, rope, final=True)[2]  # [B, P+n, D]
        y = self.decoder_embed(x)  # [B, P+n, Dd]
        full = self.mask_token.to(y.dtype).expand(b, n, -1).clone()  # [B, N, Dd]
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, y.shape[-1]), y[:, p:])  # visible back in place
        y = torch.cat([y[:, :p], full], dim=1) + self.decoder_pos_embed  # [B, P+N, Dd]
        for blk in self.decoder_blocks:
            y = blk(y)
        pred = self.decoder_pred(self.decoder_norm(y))[:, p:]  # [B, N, p·p·3]
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
        data.check_batch(cfg.data.source, cfg.train.batch_size, ui.world_size())
        p = cfg.pretrain
        self.model = MaskedAutoencoder(build_encoder(cfg), mask_ratio=p.mask_ratio, decoder_dim=p.decoder_dim,
                                       decoder_depth=p.decoder_depth, decoder_heads=p.decoder_heads,
                                       norm_pix_loss=p.norm_pix_loss)

    def train_loader(self, *, rank: int, world_size: int, seed: int):
        return data.augmented_loader(self.cfg.data, self.cfg.train.batch_size, rank=rank,
                                     world_size=world_size, seed=seed,
                                     cuda=torch.cuda.is_available() and not self.cfg.train.cpu)

    def loss(self, model: nn.Module, batch, *, detail: bool = False) -> dict[str, torch.Tensor]:
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
        p, d = cfg.pretrain, cfg.data
        src = data.parse_source(d.source)
        if src.kind in ("cifar100", "fashion-mnist"):
            data.open_records(src, "train")  # missing files fail before any model is built
        data.check_batch(d.source, cfg.train.batch_size, ui.world_size())
        self.num_classes = p.num_classes or data.num_classes(d.source)
        self.model = build_encoder(cfg, num_classes=self.num_classes)
        # per-image augmentation a function of (seed, epoch, position)
        self.transform = classify.train_transform(d.img_size, scale=d.scale, hflip=d.hflip, auto_augment=p.auto_augment,
                                                  key="pretrain.auto_augment",
                                                  examples="rand-m9-mstd0.5-inc1 (DeiT), original, or none")
        self.step = classify.ClassifyStep(self.num_classes, mixup=p.mixup, cutmix=p.cutmix, smoothing=p.smoothing,
                                          reprob=p.reprob)

    def train_loader(self, *, rank: int, world_size: int, seed: int):
        d = self.cfg.data
        return data.build_loader(
            d.source, split="train", img_size=d.img_size, batch_size=self.cfg.train.batch_size, train=True,
            num_workers=d.num_workers, rank=rank, world_size=world_size, seed=seed, transform=self.transform,
            epoch_steps=d.epoch_steps, max_bad_fraction=d.max_bad_fraction)

    def loss(self, model: nn.Module, batch, *, detail: bool = False) -> dict[str, torch.Tensor]:
        return {"loss": self.step(model, *batch)}

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
             resume_hint: str | None = None, allow_config_change: bool = False) -> dict:
    """Train ``cfg`` with the engine into ``run_dir``; returns the engine's summary (``student``: the export)."""
    from hdcli.train import engine

    data.parse_source(cfg.data.source)  # a wrong path fails before any run dir exists
    return engine.train(lambda: make_task(cfg), cfg, run_dir, resume=resume, resume_hint=resume_hint,
                          allow_config_change=allow_config_change)
