"""Run configuration: dataclass sections whose defaults are the paper's numbers (METHOD.md), TOML recipes
that list only what differs, CLI overrides on top, and the resolved config written to ``<run>/config.toml``.

    cfg = load_config(DistillConfig, recipe="recipes/distill/tiny-cpu.toml",
                      overrides={"train.steps": 50, "optim.blr": None})   # None = not given
    save_config(cfg, run_dir / "config.toml")

A config class is a dataclass whose fields are *sections* (dataclasses); finetune/pretrain define their
own top-level class reusing ``TrainConfig``/``OptimConfig``/``DataConfig``/``StudentConfig`` and adding
sections of their own. The engine reads only ``cfg.train`` and ``cfg.optim``.

TOML has no null: an optional field is unset with the string ``"none"`` (that is also how the resolved
config writes it), e.g. ``clip_grad = "none"``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdcli.errors import HDError, closest

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
MASKING = ("progressive", "direct", "random", "none")
RELATION_HEADS = ("match", "mean")
TARGET_KINDS = ("features", "relations", "block", "msa")
TARGET_KEYS = ("teacher", "kind", "blocks", "weight", "student_blocks", "name")


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
    tensorboard: bool = False  # also log to <run>/tensorboard through Accelerate's tracker
    nan_tolerance: int = 10  # consecutive non-finite steps skipped before the run stops with an error

    def validate(self) -> None:
        _positive(self, "train", "batch_size", "accum_steps", "epochs", "save_every", "keep_checkpoints", "log_every")
        if self.steps is not None and self.steps < 1:
            raise HDError(f"train.steps must be ≥ 1, got {self.steps}", "or unset it ('none') to train for train.epochs")
        _choice(self.mixed_precision, MIXED_PRECISION, "train.mixed_precision")
        if self.nan_tolerance < 0:
            raise HDError(f"train.nan_tolerance must be ≥ 0, got {self.nan_tolerance}")


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
        _positive(self, "optim", "blr", "eps")
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
    epoch_steps: int | None = None  # batches per epoch per rank (shards without a sample count)
    max_bad_fraction: float = 0.001  # undecodable images tolerated before the run fails

    def validate(self) -> None:
        _positive(self, "data", "img_size")
        if self.num_workers is not None and self.num_workers < 0:
            raise HDError(f"data.num_workers must be ≥ 0, got {self.num_workers}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise HDError(f"data.scale must satisfy 0 < min ≤ max ≤ 1, got {list(self.scale)}")
        if not 0 <= self.hflip <= 1:
            raise HDError(f"data.hflip is a probability, got {self.hflip}")
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

    def validate(self) -> None:
        if self.patch_size is not None and self.patch_size < 1:
            raise HDError(f"student.patch_size must be ≥ 1, got {self.patch_size}")
        if not 0 <= self.drop_path < 1:
            raise HDError(f"student.drop_path must lie in [0, 1), got {self.drop_path}")
        for bad in ("img_size", "patch_size", "num_classes", "drop_path_rate", "pretrained"):
            if bad in self.kwargs:
                raise HDError(f"student.kwargs may not set {bad!r}",
                              "use data.img_size, student.patch_size and student.drop_path instead")


# ---------------------------------------------------------------- hd distill

@dataclass
class MethodConfig:
    """What to distil (METHOD.md). Empty ``targets`` = the paper's hybrid: features of ``teachers[1]`` and
    relations of ``teachers[0]`` (the MIM teacher, which also chooses the kept tokens)."""

    teachers: list[str] = field(default_factory=lambda: ["mae", "clip"])  # MIM first; names, tags, dirs, random:ARCH
    teacher_kwargs: dict = field(default_factory=dict)  # timm kwargs for random:ARCH teachers (tiny runs)
    relation_blocks: list[int] = field(default_factory=lambda: [9, 10])  # MIM teacher blocks (paper layers 10, 11)
    student_relation_blocks: list[int] | None = None  # default: relation_blocks
    mask_blocks: list[int] = field(default_factory=lambda: [0, 4, 8])
    drop_ratio: float = 0.3  # 196 → 137 → 96 → 67 tokens (34% kept)
    masking: str = "progressive"  # progressive | direct | random | none (paper Tab. 8)
    alpha: float = 1.0  # weight of the relation loss
    beta: float = 2.0  # SmoothL1 beta
    relation_heads: str = "match"  # match | mean
    mask_teacher: str | None = None  # general form only: the teacher choosing kept tokens (default teachers[0])
    targets: list[dict] = field(default_factory=list)  # general form: [{teacher, kind, blocks, weight}, ...]

    def validate(self) -> None:
        if not self.teachers:
            raise HDError("distill.teachers is empty", "name the MIM teacher first, then the feature teacher: mae,clip")
        if not 0 <= self.drop_ratio < 1:
            raise HDError(f"distill.drop_ratio must lie in [0, 1), got {self.drop_ratio}")
        _choice(self.masking, MASKING, "distill.masking")
        _choice(self.relation_heads, RELATION_HEADS, "distill.relation_heads")
        if self.alpha < 0 or not self.beta > 0:
            raise HDError(f"distill.alpha must be ≥ 0 and distill.beta > 0, got {self.alpha}, {self.beta}")
        for what in ("relation_blocks", "mask_blocks", "student_relation_blocks"):
            blocks = getattr(self, what) or []
            if any(b < 0 for b in blocks):
                raise HDError(f"distill.{what} are 0-based block indices, got {blocks}")
        if not self.targets and len(self.teachers) != 2:
            raise HDError(f"the hybrid default needs two teachers (MIM first, then features), got {self.teachers}",
                          "for other combinations list [[distill.targets]] (see docs/distill.md)")
        if self.mask_teacher is not None and self.mask_teacher not in self.teachers:
            raise HDError(f"distill.mask_teacher {self.mask_teacher!r} is not one of distill.teachers",
                          _hint(self.mask_teacher, self.teachers))
        for i, t in enumerate(self.targets):
            where = f"distill.targets[{i}]"
            for k in t:
                if k not in TARGET_KEYS:
                    raise HDError(f"unknown key {where}.{k}", _hint(k, TARGET_KEYS))
            for k in ("teacher", "kind"):
                if k not in t:
                    raise HDError(f"{where} needs a {k!r}", "e.g. {teacher = \"clip\", kind = \"features\"}")
            if t["teacher"] not in self.teachers:
                raise HDError(f"{where}.teacher {t['teacher']!r} is not one of distill.teachers {self.teachers}",
                              _hint(str(t["teacher"]), self.teachers))
            _choice(t["kind"], TARGET_KINDS, f"{where}.kind")


@dataclass
class DistillConfig:
    """``hd distill``: every setting of a run. Defaults = the paper's main setting (METHOD.md)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: MethodConfig = field(default_factory=MethodConfig)


# ---------------------------------------------------------------- hd finetune

FT_DATASETS = ("cifar100", "imagenet", "cars", "inat19", "folder", "demo", "fashion-mnist")
GLOBAL_POOLS = ("avg", "token")
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
            _choice(self.dataset, FT_DATASETS, "finetune.dataset")
        _choice(self.global_pool, GLOBAL_POOLS, "finetune.global_pool")
        _choice(self.mixup_mode, MIXUP_MODES, "finetune.mixup_mode")
        _choice(self.remode, ERASE_MODES, "finetune.remode")
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

    def validate(self) -> None:
        fc = self.finetune
        if fc.dataset is None:
            raise HDError("no dataset given", f"name one: hd finetune {{{'|'.join(FT_DATASETS)}}} ...")
        if not fc.student:
            raise HDError("no student given", "--student RUN_DIR | RUN_DIR/student | local-dir:PATH | timm tag")
        mixing = fc.mixup > 0 or fc.cutmix > 0 or fc.cutmix_minmax is not None
        if mixing and self.train.batch_size % 2:
            raise HDError(f"Mixup/CutMix mixes a batch with its reverse and needs an even batch size, got "
                          f"{self.train.batch_size}", "use an even --batch-size or turn off --mixup and --cutmix")


# ---------------------------------------------------------------- validation helpers

def _hint(word: str, choices) -> str:
    hits = closest(word, list(choices))
    return f"did you mean: {', '.join(hits)}?" if hits else ""


def _positive(obj, section: str, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not v > 0:
            raise HDError(f"{section}.{n} must be > 0, got {v}")


def _choice(value, choices, key: str) -> None:
    if value not in choices:
        raise HDError(f"{key} must be one of {', '.join(choices)}; got {value!r}", _hint(str(value), choices))


# ---------------------------------------------------------------- generic machinery

def sections(cls) -> dict[str, type]:
    """Section name -> dataclass type of a top-level config class."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls) -> list[str]:
    """Every dotted key a config class accepts (``train.batch_size``, ...)."""
    return [f"{s}.{f.name}" for s, sc in sections(cls).items() for f in dataclasses.fields(sc)]


def _unknown(key: str, cls, where: str) -> HDError:
    keys = valid_keys(cls)
    # a bare key that exists in some section is the commonest slip: suggest the dotted key directly
    exact = [k for k in keys if k.rsplit(".", 1)[1] == key.rsplit(".", 1)[-1]]
    hits = exact or closest(key, keys)
    return HDError(f"unknown config key {key!r} in {where}", f"did you mean: {', '.join(hits)}?" if hits else "")


def _is_optional(tp) -> tuple[bool, Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, args[0] if len(args) == 1 else functools.reduce(operator.or_, args)
    return False, tp


def coerce(value, tp, key: str):
    """Check/convert one value read from TOML or the CLI against the field's type; HDError naming the key."""
    optional, tp = _is_optional(tp)
    if optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
        return None
    origin = typing.get_origin(tp)

    def bad(expected: str):
        return HDError(f"{key} must be {expected}, got {value!r}")

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad("a table, e.g. {embed_dim = 48}")
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if isinstance(value, str) and origin is list:  # "9,10" from a CLI flag
            value = [v.strip() for v in value.split(",") if v.strip()]
            if args and args[0] in (int, float):
                try:
                    value = [args[0](v) for v in value]
                except ValueError:
                    raise bad(f"a comma-separated list of {args[0].__name__}s") from None
        if not isinstance(value, list | tuple):
            raise bad("a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad(f"a list of {len(args)} values")
            return tuple(coerce(v, a, key) for v, a in zip(value, args, strict=True))
        inner = args[0] if args else typing.Any
        out = [v if inner is typing.Any else coerce(v, inner, key) for v in value]
        return tuple(out) if origin is tuple else out
    return value


def from_dict(cls, data: dict, where: str = "the recipe"):
    """Build a config from nested dicts (a parsed recipe) on top of the defaults; unknown keys -> HDError."""
    cfg = cls()
    merge(cfg, data, where)
    return cfg


def merge(cfg, data: dict, where: str) -> None:
    """Apply a nested dict ``{section: {key: value}}`` onto ``cfg`` in place, checking every key and type."""
    secs = sections(type(cfg))
    for sname, values in data.items():
        if sname not in secs:
            if isinstance(values, dict):  # a mistyped section name
                raise HDError(f"unknown config section [{sname}] in {where}", _hint(sname, secs))
            raise _unknown(sname, type(cfg), where)  # a bare key outside any section
        if not isinstance(values, dict):
            raise HDError(f"[{sname}] in {where} must be a table of settings, got {values!r}")
        sec = getattr(cfg, sname)
        hints = typing.get_type_hints(type(sec))
        for key, value in values.items():
            if key not in hints:
                raise _unknown(f"{sname}.{key}", type(cfg), where)
            setattr(sec, key, coerce(value, hints[key], f"{sname}.{key}"))


def apply_overrides(cfg, overrides: dict[str, Any], where: str = "the command line") -> None:
    """Set dotted keys (``{"optim.blr": 1e-4}``); values of None mean 'not given' and are skipped."""
    nested: dict[str, dict] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if "." not in key:
            raise _unknown(key, type(cfg), where)
        sname, name = key.split(".", 1)
        nested.setdefault(sname, {})[name] = value
    merge(cfg, nested, where)


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``["optim.blr=1e-4", "student.kwargs={depth=6}"]`` -> dotted dict; values are TOML, else strings."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise HDError(f"--set expects KEY=VALUE, got {item!r}", "e.g. --set optim.min_lr=1e-6")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out[key.strip()] = value
    return out


def read_toml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise HDError(f"recipe not found: {path}", "give a path to a .toml file, e.g. recipes/distill/tiny-cpu.toml")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise HDError(f"{path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise HDError(f"{path} is not a text file") from None


def validate(cfg) -> None:
    """Run each section's ``validate()`` then the config's own (cross-section checks), if any."""
    for sname in sections(type(cfg)):
        check = getattr(getattr(cfg, sname), "validate", None)
        if check:
            check()
    check = getattr(cfg, "validate", None)
    if check:
        check()


def load_config(cls, recipe: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                base: str | os.PathLike | None = None):
    """Defaults <- ``base`` (a resolved config.toml, when resuming) <- recipe <- CLI overrides; validated."""
    cfg = cls()
    if base is not None:
        merge(cfg, read_toml(base), str(base))
    if recipe is not None:
        merge(cfg, read_toml(recipe), str(recipe))
    apply_overrides(cfg, overrides or {})
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- TOML writer (tomllib only reads)

def _key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) else _string(k)


def _string(s: str) -> str:
    out = []
    for c in s:
        if c == "\\":
            out.append("\\\\")
        elif c == '"':
            out.append('\\"')
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(v) -> str:
    if v is None:
        return '"none"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # shortest round-trip form; always has '.' or 'e'
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, os.PathLike):
        return _string(os.fspath(v))
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_dict(cfg) -> dict:
    return {s: dataclasses.asdict(getattr(cfg, s)) for s in sections(type(cfg))}


def dump_config(cfg, header: str = "") -> str:
    """The full config as TOML, one table per section (what ``tomllib`` + ``from_dict`` read back equal)."""
    lines = [f"# {line}" for line in header.splitlines()]
    for sname, values in to_dict(cfg).items():
        if lines:
            lines.append("")
        lines.append(f"[{sname}]")
        lines += [f"{_key(k)} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def save_config(cfg, path: str | os.PathLike, header: str = "resolved configuration of this run (hd writes it)") -> Path:
    """Write the resolved config atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(dump_config(cfg, header))
    os.replace(tmp, path)
    return path
