"""The config dataclasses of ``hd``: the sections shared by every training command, whose defaults are the
paper's numbers (METHOD.md), the top-level configs of finetune and pretrain, their presets and loaders
(``hd distill``'s are in :mod:`hdcli.config.distill`).

A config class is a dataclass whose fields are *sections* (dataclasses); finetune/pretrain reuse
``TrainConfig``/``OptimConfig``/``DataConfig``/``StudentConfig`` and add sections of their own. The engine
reads only ``cfg.train`` and ``cfg.optim``. Torch-free, so ``hd --help`` can read defaults from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from hdcli.config.loading import load_config
from hdcli.errors import HDError, did_you_mean

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
TRACKERS = ("tensorboard", "wandb")
DECODE = ("auto", "cpu", "pil", "gpu")  # the training crop's decode paths (hdcli.data.decode)


# ---------------------------------------------------------------- sections shared by every training command

@dataclass
class TrainConfig:
    """The loop: batch, length, precision, seeding, checkpoints and logging (read by ``hdcli.train.engine``)."""

    batch_size: int = 128  # per device (per process); global batch = batch_size × accum_steps × processes
    accum_steps: int = 1  # micro-batches per optimiser step (gradient accumulation)
    epochs: int = 300  # METHOD.md: 300 epochs for ViT-B on IN-1k
    steps: int | None = None  # total optimiser steps; overrides epochs when set
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, else no) | no | bf16 | fp16
    seed: int = 0
    compile: bool = False  # torch.compile (inductor) through Accelerate
    cpu: bool = False  # force the CPU even where a GPU is visible
    save_every: int = 1000  # optimiser steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept in <run>/checkpoints
    log_every: int = 50  # optimiser steps between metrics lines (the only host syncs of the loop)
    tensorboard: bool = False  # also log to <run>/tensorboard through Accelerate's tracker (= trackers += tensorboard)
    trackers: list[str] = field(default_factory=list)  # tensorboard | wandb (Accelerate's trackers, main process)
    plot: bool = True  # write <run>/plots/*.png (hd plot) when the run ends
    nan_tolerance: int = 10  # consecutive non-finite steps skipped before the run stops with an error

    @property
    def all_trackers(self) -> list[str]:
        """``trackers``, with tensorboard added when ``tensorboard`` is set."""
        return list(dict.fromkeys([*self.trackers, *(["tensorboard"] if self.tensorboard else [])]))

    def validate(self) -> None:
        check_positive(self, "train", "batch_size", "accum_steps", "epochs", "save_every", "keep_checkpoints", "log_every")
        if self.steps is not None and self.steps < 1:
            raise HDError(f"train.steps must be ≥ 1, got {self.steps}", "or unset it ('none') to train for train.epochs")
        check_choice(self.mixed_precision, MIXED_PRECISION, "train.mixed_precision")
        if self.nan_tolerance < 0:
            raise HDError(f"train.nan_tolerance must be ≥ 0, got {self.nan_tolerance}")
        for t in self.trackers:
            check_choice(t, TRACKERS, "train.trackers")


@dataclass
class OptimConfig:
    """AdamW with a per-step cosine schedule and linear warm-up (METHOD.md's table)."""

    blr: float = 1.5e-4  # base lr: lr = blr × global batch / 256 (6e-4 at batch 1024)
    lr: float | None = None  # absolute lr; overrides blr when set
    weight_decay: float = 0.05  # not applied to norms, biases, pos_embed, cls_token
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    min_lr: float = 0.0  # cosine floor
    warmup_epochs: float = 40.0  # dBOT
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    clip_grad: float | None = 3.0  # max global grad norm ('none': no clipping)

    def validate(self) -> None:
        check_positive(self, "optim", "blr", "eps")
        if self.lr is not None and not self.lr > 0:
            raise HDError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.min_lr < 0 or self.warmup_epochs < 0:
            raise HDError("optim.weight_decay, optim.min_lr and optim.warmup_epochs must be ≥ 0")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise HDError(f"optim.warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if not all(0 <= b < 1 for b in self.betas):
            raise HDError(f"optim.betas must lie in [0, 1), got {list(self.betas)}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise HDError(f"optim.clip_grad must be > 0, got {self.clip_grad}", "use 'none' to disable clipping")


@dataclass
class DataConfig:
    """Where images come from and how they are augmented (METHOD.md: RandomResizedCrop (0.2, 1), bicubic, flip)."""

    source: str | None = None  # None/"demo" | fashion-mnist[:DIR] | cifar100:DIR | image folder | shard pattern
    img_size: int = 224
    num_workers: int | None = None  # None: min(8, CPUs per process − 1)
    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop scale
    hflip: float = 0.5  # horizontal flip probability (the crop is always bicubic)
    decode: str = "auto"  # auto (gpu on CUDA, else cpu) | cpu | pil (torchvision on PIL, the reference) | gpu
    epoch_steps: int | None = None  # batches per epoch per rank (shards without a sample count)
    max_bad_fraction: float = 0.001  # undecodable images tolerated before the run fails

    def validate(self) -> None:
        check_positive(self, "data", "img_size")
        if self.num_workers is not None and self.num_workers < 0:
            raise HDError(f"data.num_workers must be ≥ 0, got {self.num_workers}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise HDError(f"data.scale must satisfy 0 < min ≤ max ≤ 1, got {list(self.scale)}")
        if not 0 <= self.hflip <= 1:
            raise HDError(f"data.hflip is a probability, got {self.hflip}")
        check_choice(self.decode, DECODE, "data.decode")
        if self.epoch_steps is not None and self.epoch_steps < 1:
            raise HDError(f"data.epoch_steps must be ≥ 1, got {self.epoch_steps}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise HDError(f"data.max_bad_fraction is a fraction in [0, 1], got {self.max_bad_fraction}")


@dataclass
class StudentConfig:
    """The student: any timm ViT, randomly initialised, no classifier."""

    arch: str = "vit_base_patch16_224"
    patch_size: int | None = None  # override the architecture's patch size (tiny runs)
    drop_path: float = 0.2  # dBOT
    kwargs: dict = field(default_factory=dict)  # extra timm kwargs, e.g. {embed_dim = 48, depth = 12, num_heads = 3}
    init: str = "random"  # random | a pretrained model of the same architecture: local-dir:DIR, a run dir, a hub tag
    freeze_blocks: int = 0  # the embeddings and the first N blocks stay as initialised (with init: continued training)
    freeze: list[str] = field(default_factory=list)  # parameter-name patterns kept frozen too (fnmatch: "blocks.0.*")

    def validate(self) -> None:
        if self.patch_size is not None and self.patch_size < 1:
            raise HDError(f"student.patch_size must be ≥ 1, got {self.patch_size}")
        if self.freeze_blocks < 0:
            raise HDError(f"student.freeze_blocks must be ≥ 0, got {self.freeze_blocks}")
        if not self.init.strip():
            raise HDError("student.init is empty", "random, local-dir:DIR, a run dir or a timm hub tag")
        if not 0 <= self.drop_path < 1:
            raise HDError(f"student.drop_path must lie in [0, 1), got {self.drop_path}")
        for bad in ("img_size", "patch_size", "num_classes", "drop_path_rate", "pretrained"):
            if bad in self.kwargs:
                raise HDError(f"student.kwargs may not set {bad!r}",
                              "use data.img_size, student.patch_size and student.drop_path instead")


# ---------------------------------------------------------------- hd finetune

FT_DATASETS = ("cifar100", "imagenet", "cars", "inat19", "folder", "demo", "fashion-mnist")
GLOBAL_POOLS = ("avg", "token", "map")  # map: an attention-pool head (SigLIP, PE)
MIXUP_MODES = ("batch", "pair", "elem")
ERASE_MODES = ("pixel", "rand", "const")


@dataclass
class FinetuneSection:
    """``[finetune]``: what is fine-tuned on which data, and MAE's fine-tuning recipe (ViT-B, IN-1k) from timm."""

    dataset: str | None = None  # cifar100 | imagenet | cars | inat19 | folder | demo | fashion-mnist
    student: str | None = None  # run dir, its student/ dir, local-dir:PATH, registry name or timm tag
    eval_data: str | None = None  # evaluation source (default: the eval_split of data.source)
    eval_split: str = "val"  # val (test where there is no val, e.g. CIFAR-100) | test | train
    eval_batch_size: int | None = None  # default: train.batch_size
    num_classes: int | None = None  # default: from the data (class folders, CIFAR meta, _info.json)
    linear_probe: bool = False  # frozen backbone, BatchNorm1d(affine=False) + Linear head (MAE's protocol)
    global_pool: str = "avg"  # avg (+ fc_norm, MAE fine-tuning) | token (final-norm CLS, MAE linear probing)
    drop_path: float = 0.1
    layer_decay: float = 0.65  # lr scale layer_decay^(depth+1-layer) (timm's param_groups_layer_decay); not when linear probing
    mixup: float = 0.8  # Mixup alpha (0: off)
    cutmix: float = 1.0  # CutMix alpha (0: off)
    cutmix_minmax: list[float] | None = None
    mixup_prob: float = 1.0  # probability of mixing a batch
    mixup_switch_prob: float = 0.5  # probability of CutMix instead of Mixup when both are on
    mixup_mode: str = "batch"  # batch | pair | elem
    smoothing: float = 0.1  # label smoothing
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec ('none': off)
    color_jitter: float | None = None  # only used without auto_augment (MAE: none)
    reprob: float = 0.25  # random erasing probability
    remode: str = "pixel"  # pixel | rand | const
    recount: int = 1  # erased regions per image
    crop_pct: float | None = None  # eval resize img_size/crop_pct + centre crop; default 1.0 (cifar100, demo,
    #                                fashion-mnist: upsampled small images) else 0.875

    def validate(self) -> None:
        if self.dataset is not None:
            check_choice(self.dataset, FT_DATASETS, "finetune.dataset")
        check_choice(self.global_pool, GLOBAL_POOLS, "finetune.global_pool")
        check_choice(self.mixup_mode, MIXUP_MODES, "finetune.mixup_mode")
        check_choice(self.remode, ERASE_MODES, "finetune.remode")
        if not 0 <= self.drop_path < 1:
            raise HDError(f"finetune.drop_path must lie in [0, 1), got {self.drop_path}")
        if not 0 < self.layer_decay <= 1:
            raise HDError(f"finetune.layer_decay must lie in (0, 1], got {self.layer_decay}", "1.0 turns it off")
        if self.mixup < 0 or self.cutmix < 0:
            raise HDError(f"finetune.mixup and finetune.cutmix are Beta alphas ≥ 0, got {self.mixup}, {self.cutmix}")
        for name in ("mixup_prob", "mixup_switch_prob", "reprob"):
            if not 0 <= getattr(self, name) <= 1:
                raise HDError(f"finetune.{name} is a probability, got {getattr(self, name)}")
        if not 0 <= self.smoothing < 1:
            raise HDError(f"finetune.smoothing must lie in [0, 1), got {self.smoothing}")
        if self.cutmix_minmax is not None and (len(self.cutmix_minmax) != 2
                                               or not 0 < self.cutmix_minmax[0] <= self.cutmix_minmax[1] <= 1):
            raise HDError(f"finetune.cutmix_minmax must be [min, max] with 0 < min ≤ max ≤ 1, got {self.cutmix_minmax}")
        if self.recount < 1:
            raise HDError(f"finetune.recount must be ≥ 1, got {self.recount}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise HDError(f"finetune.crop_pct must lie in (0, 1], got {self.crop_pct}")
        for name in ("num_classes", "eval_batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise HDError(f"finetune.{name} must be ≥ 1, got {v}")
        if self.auto_augment is not None and not self.auto_augment.strip():
            raise HDError("finetune.auto_augment is empty", "use 'none' to turn RandAugment off")


@dataclass
class FinetuneConfig:
    """``hd finetune``: every setting of a run. Defaults = MAE's ViT-B fine-tuning recipe (100 epochs, global
    batch 1024 on 8 devices, blr 5e-4, layer decay 0.65, warm-up 5, AdamW betas (0.9, 0.999), min lr 1e-6)."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        blr=5e-4, betas=(0.9, 0.999), min_lr=1e-6, warmup_epochs=5.0, clip_grad=None))
    data: DataConfig = field(default_factory=lambda: DataConfig(scale=(0.08, 1.0)))  # timm/MAE crop scale
    finetune: FinetuneSection = field(default_factory=FinetuneSection)

    IDENTITY = ("finetune.dataset", "finetune.student", "finetune.num_classes", "finetune.linear_probe",
                "finetune.global_pool", "data.img_size")

    def validate(self) -> None:
        check_schedule(self)
        fc = self.finetune
        if fc.dataset is None:
            raise HDError("no dataset given", f"name one: hd finetune {{{'|'.join(FT_DATASETS)}}} ...")
        if not fc.student:
            raise HDError("no student given", "--student RUN_DIR | RUN_DIR/student | local-dir:PATH | timm tag")
        mixing = fc.mixup > 0 or fc.cutmix > 0 or fc.cutmix_minmax is not None
        if mixing and self.train.batch_size % 2:
            raise HDError(f"Mixup/CutMix mixes a batch with its reverse and needs an even batch size, got "
                          f"{self.train.batch_size}", "use an even --batch-size or turn off --mixup and --cutmix")


# MAE's linear-probing protocol, applied under the recipe and the flags when linear probing (so
# ``--linear-probe`` alone gives it). LARS is replaced by the engine's AdamW (docs/finetune.md).
LINEAR_PROBE_DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {"epochs": 90},
    "optim": {"blr": 1e-3, "weight_decay": 0.0, "warmup_epochs": 10.0, "min_lr": 0.0},
    "finetune": {"global_pool": "token", "drop_path": 0.0, "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.0,
                 "auto_augment": None, "reprob": 0.0, "layer_decay": 1.0},
}


def load_finetune(recipe: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                  base: str | os.PathLike | None = None) -> FinetuneConfig:
    """Defaults <- linear-probe defaults (if linear probing) <- ``base`` <- recipe <- CLI overrides."""
    def linear_probe(layers, overrides):
        lp = overrides.get("finetune.linear_probe")
        for data, _ in reversed(layers):
            if lp is None and "linear_probe" in data.get("finetune", {}):
                lp = data["finetune"]["linear_probe"]
        return (LINEAR_PROBE_DEFAULTS, "the linear-probe defaults") if lp is True else None

    return load_config(FinetuneConfig, recipe, overrides, base, preset=linear_probe)


# ---------------------------------------------------------------- hd pretrain

MODES = ("mae", "supervised")

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
        check_choice(self.mode, MODES, "pretrain.mode")
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

    IDENTITY = ("student", "pretrain.mode", "pretrain.mask_ratio", "pretrain.decoder_dim", "pretrain.decoder_depth",
                "pretrain.decoder_heads", "pretrain.norm_pix_loss", "pretrain.num_classes", "data.img_size")

    def validate(self) -> None:
        check_schedule(self)
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


def load_pretrain(mode: str, recipe: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                  base: str | os.PathLike | None = None) -> PretrainConfig:
    """Defaults <- supervised defaults (mode supervised) <- ``base`` <- recipe <- overrides; validated."""
    check_choice(mode, MODES, "pretrain mode")
    preset = (lambda layers, overrides: (SUPERVISED_DEFAULTS, "the supervised defaults")) if mode == "supervised" else None
    return load_config(PretrainConfig, recipe, {**(overrides or {}), "pretrain.mode": mode}, base, preset=preset)


# ---------------------------------------------------------------- validation helpers

def check_schedule(cfg) -> None:
    """The lr schedule of a config with ``train`` and ``optim``: its floor ``min_lr`` may not lie above the peak lr
    (``lr``, or blr × global batch / 256 with this launch's processes), else the cosine would climb."""
    from hdcli import ui

    tc, oc = cfg.train, cfg.optim
    peak = oc.lr if oc.lr is not None else oc.blr * tc.batch_size * tc.accum_steps * ui.world_size() / 256
    if oc.min_lr > peak:
        raise HDError(f"optim.min_lr {oc.min_lr:g} is above the peak lr {peak:.3g}: the schedule would climb",
                      "lower optim.min_lr below the lr (it is the cosine's floor)")


def check_positive(obj, section: str, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not v > 0:
            raise HDError(f"{section}.{n} must be > 0, got {v}")


def check_choice(value, choices, key: str) -> None:
    if value not in choices:
        raise HDError(f"{key} must be one of {', '.join(choices)}; got {value!r}", did_you_mean(str(value), choices))
