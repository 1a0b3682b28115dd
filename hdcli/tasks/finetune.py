"""Classification fine-tuning and linear probing of a student, as a ``Task`` for the one engine loop.

    from hdcli.tasks import finetune
    cfg = finetune.load_config(recipe=None, overrides={"finetune.dataset": "cifar100", ...})
    result = finetune.finetune(cfg, "runs/ft-cifar")          # -> the results.json dict

Everything is timm's (DESIGN.md, STYLE.md): the model is a timm ViT rebuilt from the student with a
classifier (``global_pool="avg"`` + ``fc_norm`` as in MAE), layer-wise lr decay is
``param_groups_layer_decay`` (what ``create_optimizer_v2(layer_decay=...)`` builds; the engine's AdamW
applies each group's ``lr_scale``), ``Mixup``/``SoftTargetCrossEntropy``, ``create_transform``
(RandAugment) and ``RandomErasing``. As in timm's own training script with its prefetcher, the
per-image augmentation runs in the data workers and yields uint8 images (the data contract); the batch
is normalised, randomly erased and mixed on the device.

``--linear-probe`` (MAE's protocol, ``main_linprobe.py``): the backbone is frozen (engine ``frozen``:
eval mode, not in checkpoints), the classifier is ``BatchNorm1d(affine=False)`` + ``Linear`` on the
final-norm CLS token; only the head trains. The export folds the BatchNorm into the Linear, so the
saved model is a plain timm ViT with identical outputs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from hdcli import config, data, ui
from hdcli.config import FinetuneConfig
from hdcli.errors import HDError
from hdcli.rundir import RESULTS, STUDENT, read_json, write_json
from hdcli.tasks import classify
from hdcli.train.optim import param_groups_weight_decay, total_steps
from hdcli.train.task import Task

LOW_RES = ("cifar100", "demo", "fashion-mnist")  # small images upsampled: evaluated without a crop margin
HEAD_INIT_STD = {"finetune": 2e-5, "linear_probe": 0.01}  # MAE main_finetune.py / main_linprobe.py

load_config = config.load_finetune  # defaults <- linear-probe preset <- base <- recipe <- flags (hdcli.config)


# ---------------------------------------------------------------- configuration

def data_source(dataset: str, data_dir: str | None) -> str:
    """The ``hdcli.data`` source string of ``dataset`` stored in ``data_dir``."""
    if dataset == "demo":
        return "demo"
    if dataset == "fashion-mnist":
        return f"fashion-mnist:{data_dir}" if data_dir else "fashion-mnist"
    if not data_dir:
        raise HDError(f"{dataset} needs --data-dir", {
            "cifar100": "the folder holding cifar-100-python/ or cifar-100-python.tar.gz",
        }.get(dataset, "an image folder with train/ and val/ (or test/) class folders, or WebDataset shards"))
    if dataset == "cifar100":
        return data_dir if data_dir.startswith(("cifar100:", "cifar-100:")) else f"cifar100:{data_dir}"
    return data_dir


def eval_source(cfg: FinetuneConfig) -> tuple[str, str]:
    """(source, split) evaluated after each epoch; HDError where it would be the training data."""
    fc = cfg.finetune
    if fc.eval_data:
        return data_source(fc.dataset, fc.eval_data), fc.eval_split
    src = data.parse_source(data_source(fc.dataset, cfg.data.source))
    if src.kind == "shards" and data.is_pattern(src.spec):
        raise HDError(f"{src.spec} names the training shards only: the evaluation shards are unknown",
                      "give them with --eval-data (e.g. DIR/val-{000000..000009}.tar), or pass the shard directory")
    if src.kind == "folder" and not any((Path(src.path) / d).is_dir() for d in data.KNOWN_SPLITS):
        raise HDError(f"{src.path} has no split folders, so the model would be evaluated on its training images",
                      "use ROOT/train/CLASS/... + ROOT/val/CLASS/..., or give the evaluation folder with --eval-data")
    return src.spec, fc.eval_split


def crop_pct(cfg: FinetuneConfig) -> float:
    """Eval crop: resize to img_size / crop_pct, centre-crop img_size (1.0 for upsampled low-res sets)."""
    if cfg.finetune.crop_pct is not None:
        return cfg.finetune.crop_pct
    return 1.0 if cfg.finetune.dataset in LOW_RES else 0.875


def check_split(source: str, split: str) -> None:
    """Check a source's path, and read the in-memory sets (CIFAR-100 pickles, Fashion-MNIST files; cached for
    the loaders) so that a missing or corrupt file is an HDError naming it before any model is built.
    Folders and shards are listed once, by their loader."""
    src = data.parse_source(source)
    if src.kind in ("cifar100", "fashion-mnist"):
        data.open_records(src, split)


# ---------------------------------------------------------------- pure pieces

def fold_batchnorm(bn: nn.BatchNorm1d, linear: nn.Linear) -> nn.Linear:
    """One Linear equal to ``linear(bn(x))`` for a BatchNorm1d in eval mode (running statistics).

    bn(x) = (x − μ) / σ · γ + β with σ = sqrt(var + eps) (γ = 1, β = 0 without affine), so
    W' = W · (γ/σ) (per input column), b' = b + W · (β − μ·γ/σ).
    """
    sigma = torch.sqrt(bn.running_var + bn.eps)  # [D]
    gamma = bn.weight if bn.affine else torch.ones_like(sigma)  # [D]
    beta = bn.bias if bn.affine else torch.zeros_like(sigma)  # [D]
    scale = gamma / sigma  # [D]
    out = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device)
    with torch.no_grad():
        out.weight.copy_(linear.weight * scale[None, :])  # [K, D]
        shift = beta - bn.running_mean * scale  # [D]
        out.bias.copy_(linear.bias + linear.weight @ shift)  # [K]
    return out


# ---------------------------------------------------------------- model

def check_student(student: str) -> None:
    """HDError now for a student that is neither a model directory nor a known name/tag (cheap)."""
    from hdcli import teachers
    from hdcli.teachers import student_dir

    if student_dir(student) is None:
        try:
            teachers.resolve(student)
        except HDError as e:
            raise HDError(f"unknown student '{student}': not a model directory, a registry name or a timm model",
                          e.hint) from None


def _student_weights(student: str) -> Path | None:
    """The safetensors file of a student given as a directory (None for registry names / timm tags)."""
    from hdcli.teachers import WEIGHT_FILES, student_dir

    d = student_dir(student)
    if d is None:
        return None
    f = d / WEIGHT_FILES[0]
    return f if f.is_file() else None


def build_model(cfg: FinetuneConfig, num_classes: int) -> nn.Module:
    """The student as a timm ViT with a fresh classifier (MAE: avg pool + fc_norm, head std 2e-5); for
    linear probing a BatchNorm1d(affine=False) + Linear head and everything else frozen."""
    from timm.layers import trunc_normal_

    from hdcli import teachers
    from hdcli.teachers import student_dir

    fc = cfg.finetune
    d = student_dir(fc.student)
    name = f"local-dir:{d.resolve()}" if d is not None else fc.student
    pool = _pooling(fc, d, name)
    # timm loads non-strictly when the class count changes and logs the final norm that avg pooling
    # leaves unused as "unexpected"; teachers.check_coverage below does the real check
    builder_log = logging.getLogger("timm.models._builder")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)
    try:
        model = teachers.create(name, pretrained=True, num_classes=num_classes, global_pool=pool,
                                drop_path_rate=fc.drop_path, img_size=cfg.data.img_size)
    finally:
        builder_log.setLevel(level)
    if not hasattr(model, "blocks") or not isinstance(getattr(model, "head", None), nn.Linear):
        raise HDError(f"{fc.student} is not a timm ViT with a linear classifier ({type(model).__name__})",
                      "fine-tune a ViT student (a run dir, its student/ dir, or a ViT tag)")
    patch = model.patch_embed.patch_size
    if cfg.data.img_size % patch[0] or cfg.data.img_size % patch[1]:
        raise HDError(f"--img-size {cfg.data.img_size} is not a multiple of the student's patch size {patch[0]}",
                      f"e.g. --img-size {max(1, round(cfg.data.img_size / patch[0])) * patch[0]}")
    weights = _student_weights(fc.student)
    if weights is not None:  # MAE: a new classifier (and a new fc_norm for average pooling, the old norm unused)
        own = _own_pooling(d)
        if pool == "avg" and isinstance(model.norm, nn.Identity):  # timm moved the final norm to fc_norm
            fresh, dropped = ["head.", "fc_norm."], ["head.", "norm."]
        elif own == "avg" and pool != "avg":  # its fc_norm goes unused, norm is trained afresh
            fresh, dropped = ["head.", "norm."], ["head.", "fc_norm."]
        else:
            fresh, dropped = ["head."], ["head."]
        if own == "map" and pool != "map":  # a SigLIP/PE-style student's attention pool goes unused
            dropped.append("attn_pool.")
        elif pool == "map" and own != "map":  # a new attention pool
            fresh.append("attn_pool.")
        teachers.check_coverage(model, weights, fresh=tuple(fresh), dropped=tuple(dropped), who="the student")
    mode = "linear_probe" if fc.linear_probe else "finetune"
    head = model.head
    trunc_normal_(head.weight, std=HEAD_INIT_STD[mode])
    nn.init.zeros_(head.bias)
    if fc.linear_probe:
        model.requires_grad_(False)
        model.head = nn.Sequential(nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head)
        model.head.requires_grad_(True)
    return model


def _pooling(fc, d: Path | None, name: str) -> str:
    """``finetune.global_pool``, except for token pooling of a student without a class token (SigLIP, AIMv2 style),
    which averages its patch tokens instead, and for linear probing of a student that pools by averaging (its
    final norm may be ``fc_norm``, which token pooling would lack), which does too."""
    if fc.global_pool != "token":
        return fc.global_pool
    if not _has_class_token(name):
        if ui.is_main_process():
            ui.info("the student has no class token: it is fine-tuned on its average-pooled patch tokens")
        return "avg"
    if not fc.linear_probe or _own_pooling(d) != "avg":
        return fc.global_pool
    if ui.is_main_process():
        ui.info("the student pools by averaging: linear probing does too")
    return "avg"


def _has_class_token(name: str) -> bool:
    """Whether the student ``name`` has a class token (its architecture built on the meta device: no weights)."""
    from hdcli import teachers
    from hdcli.models import vit

    with torch.device("meta"):
        return vit.has_cls(teachers.create(name, pretrained=False, num_classes=0))


def _own_pooling(d: Path | None) -> str | None:
    """The global_pool a student was saved with (its config.json), None for hub names."""
    return None if d is None else (read_json(d / "config.json") or {}).get("global_pool")


def backbone_modules(model: nn.Module) -> list[nn.Module]:
    """Top-level children of a timm ViT other than its head (frozen when linear probing)."""
    return [m for n, m in model.named_children() if n != "head"]


def exportable(model: nn.Module) -> nn.Module:
    """A plain timm ViT (Linear head) with the same eval-mode outputs: a linear-probe head is folded."""
    if isinstance(model.head, nn.Sequential):
        model = copy.deepcopy(model)
        bn, linear = model.head
        model.head = fold_batchnorm(bn, linear)
    return model.eval()


# ---------------------------------------------------------------- transforms (timm's, uint8 out)

def train_transform(cfg: FinetuneConfig):
    """timm's training transform (RandomResizedCrop, flip, RandAugment) with the finetune settings, uint8 out."""
    fc, dc = cfg.finetune, cfg.data
    return classify.train_transform(dc.img_size, scale=dc.scale, hflip=dc.hflip, auto_augment=fc.auto_augment,
                                    color_jitter=fc.color_jitter, key="finetune.auto_augment",
                                    examples="rand-m9-mstd0.5-inc1 (MAE), rand-m9-mstd0.5, augmix-m5-w4-d2, original, "
                                    "or none")


def eval_transform(cfg: FinetuneConfig):
    """timm's eval transform: bicubic resize to img_size / crop_pct, centre crop, uint8 output."""
    from timm.data import create_transform

    return create_transform(cfg.data.img_size, is_training=False, interpolation="bicubic",
                            crop_pct=crop_pct(cfg), use_prefetcher=True)


class _CheckedLabels:
    """The training loader, with labels checked on the host (a bad label would be a device assert)."""

    def __init__(self, loader, num_classes: int, spec: str):
        self.loader, self.num_classes, self.spec = loader, num_classes, spec

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch=start_batch)

    def close(self) -> None:
        self.loader.close()

    def __iter__(self):
        for images, labels in self.loader:
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise HDError(_label_problem(labels, self.num_classes, self.spec), _LABEL_HINT)
            yield images, labels


_LABEL_HINT = "shards need a 'cls' entry per sample; set --num-classes to the number of classes"


def _label_problem(labels: torch.Tensor, num_classes: int, spec: str) -> str:
    if int(labels.min()) < 0:
        return f"{spec} has samples without a class label"
    return f"{spec} has label {int(labels.max())}, but the classifier has {num_classes} classes"


# ---------------------------------------------------------------- the task

class FinetuneTask(Task):
    """``hd finetune``: trains the classifier (all of it, or only the head when linear probing), evaluates
    top-1/top-5 after every epoch into ``<run>/results.json``, exports the model to ``<run>/student``."""

    log_keys = ("loss",)
    export_dir = STUDENT

    def __init__(self, cfg: FinetuneConfig, run_dir: str | os.PathLike):
        self.cfg, self.run_dir = cfg, Path(run_dir).resolve()
        fc = cfg.finetune
        self.source = data_source(fc.dataset, cfg.data.source)
        self.eval_spec, self.eval_split = eval_source(cfg)
        check_split(self.source, "train")  # missing/corrupt data fails before any model is built
        data.check_batch(self.source, cfg.train.batch_size, ui.world_size())
        check_split(self.eval_spec, self.eval_split)
        self.num_classes = fc.num_classes or data.num_classes(self.source)
        try:
            self.class_names = data.classes(self.source)
        except HDError:
            self.class_names = None  # shards without a class list: --num-classes says how many
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            self.class_names = None
        self.train_tf, self.eval_tf = train_transform(cfg), eval_transform(cfg)
        self.model = build_model(cfg, self.num_classes)
        self.frozen = backbone_modules(self.model) if fc.linear_probe else []
        self._eval_loader = None
        self._per_epoch: int | None = None
        self.step = classify.ClassifyStep(
            self.num_classes, mixup=fc.mixup, cutmix=fc.cutmix, cutmix_minmax=fc.cutmix_minmax,
            mixup_prob=fc.mixup_prob, mixup_switch_prob=fc.mixup_switch_prob, mixup_mode=fc.mixup_mode,
            smoothing=fc.smoothing, reprob=fc.reprob, remode=fc.remode, recount=fc.recount)

    # -- engine interface

    def train_loader(self, *, rank: int, world_size: int, seed: int):
        d = self.cfg.data
        loader = data.build_loader(
            self.source, split="train", img_size=d.img_size, batch_size=self.cfg.train.batch_size, train=True,
            num_workers=d.num_workers, rank=rank, world_size=world_size, seed=seed, transform=self.train_tf,
            epoch_steps=d.epoch_steps, max_bad_fraction=d.max_bad_fraction)
        self._per_epoch = len(loader)
        return _CheckedLabels(loader, self.num_classes, self.source)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        ld = self.cfg.finetune.layer_decay
        if self.cfg.finetune.linear_probe or ld == 1.0:
            return param_groups_weight_decay(model, weight_decay)
        from timm.optim import param_groups_layer_decay

        # exactly the groups create_optimizer_v2(model, layer_decay=ld) builds; each carries lr_scale
        return param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=ld,
                                        no_weight_decay_list=model.no_weight_decay())

    def loss(self, model: nn.Module, batch, *, detail: bool = False) -> dict[str, torch.Tensor]:
        return {"loss": self.step(model, *batch)}

    def evaluate(self, model: nn.Module, accelerator, epoch: int, step: int | None = None) -> dict[str, float]:
        device = accelerator.device
        if self._eval_loader is None:
            d = self.cfg.data
            self._eval_loader = data.build_loader(
                self.eval_spec, split=self.eval_split, img_size=d.img_size,
                batch_size=self.cfg.finetune.eval_batch_size or self.cfg.train.batch_size, train=False,
                num_workers=d.num_workers, rank=accelerator.process_index, world_size=accelerator.num_processes,
                transform=self.eval_tf, max_bad_fraction=d.max_bad_fraction)
        model.eval()
        counts = torch.zeros(3, device=device)  # top-1 hits, top-5 hits, images
        bad = None
        with torch.inference_mode(), accelerator.autocast():
            for images, labels in self._eval_loader:
                if not len(labels):
                    continue  # padding of a rank with fewer images
                if bad is None and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                    bad = _label_problem(labels, self.num_classes, self.eval_spec)
                    break
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                logits = model(data.normalize(images)).float()  # [B, K]
                counts[:2] += classify.topk_correct(logits, labels)
                counts[2] += len(labels)
        if bad is not None:
            raise HDError(bad, _LABEL_HINT)
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts, "sum")
        top1, top5, n = counts.tolist()
        if n == 0:
            raise HDError(f"the evaluation split '{self.eval_split}' of {self.eval_spec} holds no images")
        res = {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}
        if accelerator.is_main_process:
            self._record(epoch, res, int(n))
        return res

    def close(self) -> None:
        if self._eval_loader is not None:
            self._eval_loader.close()

    def export(self, model: nn.Module, out_dir: Path) -> None:
        from timm.models import save_for_hf

        d = self.cfg.data
        model_config = {"label_names": list(self.class_names)} if self.class_names else None
        data_config = {"input_size": (3, d.img_size, d.img_size), "interpolation": "bicubic",
                       "mean": data.IMAGENET_MEAN, "std": data.IMAGENET_STD, "crop_pct": crop_pct(self.cfg)}
        save_for_hf(exportable(model), str(out_dir), model_config=model_config, data_config=data_config,
                    safe_serialization=True)

    # -- helpers

    def total_epochs(self) -> int:
        tc = self.cfg.train
        if tc.steps is None or not self._per_epoch:
            return tc.epochs
        n = total_steps(epochs=tc.epochs, steps=tc.steps, batches_per_epoch=self._per_epoch, accum_steps=tc.accum_steps)
        return math.ceil(n * tc.accum_steps / self._per_epoch)

    def _record(self, epoch: int, res: dict[str, float], n: int) -> None:
        """Append this epoch to results.json (atomically); epochs from an earlier try of this run are kept
        only if they came before (a resumed run re-evaluates from where it restarted)."""
        path = self.run_dir / RESULTS
        history = []
        if path.is_file():
            try:
                old = json.loads(path.read_text())
                history = [h for h in old.get("history", []) if h.get("epoch", math.inf) < epoch + 1]
            except (OSError, ValueError, AttributeError):
                history = []
        history.append({"epoch": epoch + 1, "top1": res["top1"], "top5": res["top5"]})
        best = max(history, key=lambda h: h["top1"])
        fc = self.cfg.finetune
        results = {
            "dataset": fc.dataset, "top1": res["top1"], "top5": res["top5"],
            "best_top1": best["top1"], "best_epoch": best["epoch"], "epochs": epoch + 1,
            "total_epochs": self.total_epochs(), "linear_probe": fc.linear_probe, "student": fc.student,
            "num_classes": self.num_classes, "img_size": self.cfg.data.img_size, "eval_split": self.eval_split,
            "eval_images": n, "history": history,
        }
        write_json(path, results)
        ui.info(f"epoch {epoch + 1}/{results['total_epochs']}: top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}% "
                f"(best top-1 {best['top1']:.2f}% at epoch {best['epoch']})")


def read_results(run_dir: str | os.PathLike) -> dict | None:
    return read_json(Path(run_dir) / RESULTS)


def finetune(cfg: FinetuneConfig, run_dir: str | os.PathLike, *, resume: str | None = None,
             resume_hint: str | None = None, allow_config_change: bool = False) -> dict:
    """Fine-tune (or linear-probe) ``cfg.finetune.student`` into ``run_dir`` with the engine; return the
    engine's summary with ``results`` (the contents of results.json) added."""
    from hdcli.train import engine

    # data mistakes (missing/corrupt CIFAR files, no eval split) surface before any run dir or model exists
    check_split(data_source(cfg.finetune.dataset, cfg.data.source), "train")
    check_split(*eval_source(cfg))
    check_student(cfg.finetune.student)
    result = engine.train(lambda: FinetuneTask(cfg, run_dir), cfg, run_dir, resume=resume, resume_hint=resume_hint,
                          allow_config_change=allow_config_change)
    result["results"] = read_results(run_dir)
    return result
