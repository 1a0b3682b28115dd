"""The distillation task for the engine: a ``DistillConfig`` -> student, teachers, method, data, export.

    from hdcli.config import DistillConfig
    from hdcli.train import engine
    from hdcli.tasks.distill import DistillTask
    engine.train(lambda: DistillTask(cfg), cfg, "runs/x")

Teachers are what ``hdcli.teachers.resolve`` accepts (registry names, timm tags, ``local-dir:PATH``, a
run's ``student/``) plus ``random:ARCH``: a randomly initialised, frozen timm ViT of ``ARCH`` (built
with ``distill.teacher_kwargs``). Random teachers only exist for smoke runs and tests on machines
without pretrained weights; distilling from them teaches nothing useful.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from hdcli import data, teachers, ui
from hdcli.config import DistillConfig
from hdcli.errors import HDError
from hdcli.rundir import STUDENT
from hdcli.train.task import Task

RANDOM = "random:"


def check_teacher_names(names: list[str]) -> None:
    """Resolve every teacher name now (cheap), so typos fail before any model is built."""
    for name in names:
        if name.startswith(RANDOM):
            if not name[len(RANDOM):]:
                raise HDError(f"{name!r} names no architecture", "e.g. random:vit_base_patch16_224.mae")
            continue
        teachers.resolve(name)


def build_student(cfg: DistillConfig) -> nn.Module:
    from hdcli.models import vit

    s = cfg.student
    model = teachers.create(s.arch, pretrained=False, num_classes=0, img_size=cfg.data.img_size,
                            patch_size=s.patch_size, drop_path_rate=s.drop_path, **s.kwargs)
    vit.check_vit(model, "the student")
    vit.check_student(model, cfg.data.img_size)
    return model


def build_teacher(name: str, cfg: DistillConfig, index: int) -> nn.Module:
    """A frozen, eval-mode teacher; ``random:ARCH`` ones seeded by their position in the list only."""
    if name.startswith(RANDOM):
        kwargs = {"img_size": cfg.data.img_size, **cfg.distill.teacher_kwargs, "num_classes": 0}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 + index)
            model = teachers.create(name[len(RANDOM):], pretrained=False, **kwargs)
        return model.requires_grad_(False).eval()
    return teachers.load(name)


def teacher_key(name: str, index: int) -> str:
    """A name usable as a ``Distiller`` teacher key (no '.'), kept readable for the logged loss parts."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", name.removeprefix(RANDOM)).strip("_")
    return key or f"teacher{index}"


def build_method(student: nn.Module, models: dict[str, nn.Module], dc) -> nn.Module:
    """HybridDistill (empty ``targets``) or the general Distiller from the ``[distill]`` section."""
    from hdcli.method import Distiller, HybridDistill, Target

    names = list(models)
    if not dc.targets:
        return HybridDistill(
            student, models[dc.teachers[0]], models[dc.teachers[1]],
            relation_blocks=tuple(dc.relation_blocks), mask_blocks=tuple(dc.mask_blocks),
            drop_ratio=dc.drop_ratio, alpha=dc.alpha, beta=dc.beta, masking=dc.masking,
            relation_heads=dc.relation_heads,
            student_relation_blocks=None if dc.student_relation_blocks is None else tuple(dc.student_relation_blocks))
    keys = {name: teacher_key(name, i) for i, name in enumerate(names)}
    if len(set(keys.values())) != len(keys):
        keys = {name: f"teacher{i}" for i, name in enumerate(names)}
    targets = [Target(teacher=keys[t["teacher"]], kind=t["kind"], blocks=tuple(t.get("blocks", ())),
                      weight=float(t.get("weight", 1.0)),
                      student_blocks=None if t.get("student_blocks") is None else tuple(t["student_blocks"]),
                      name=t.get("name")) for t in dc.targets]
    needs_mask = dc.masking in ("progressive", "direct") and dc.drop_ratio > 0
    mask_teacher = dc.mask_teacher or (dc.teachers[0] if needs_mask else None)
    return Distiller(student, {keys[n]: m for n, m in models.items()}, targets,
                     mask_teacher=keys[mask_teacher] if mask_teacher else None, mask_blocks=tuple(dc.mask_blocks),
                     drop_ratio=dc.drop_ratio, masking=dc.masking, beta=dc.beta, relation_heads=dc.relation_heads)


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in v) + ")"


class DistillTask(Task):
    """``hd distill``: trains ``method.student`` + ``method.heads``; exports the student alone."""

    log_keys = ("loss", "loss_feat", "loss_rel")
    export_dir = STUDENT

    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg
        dc = cfg.distill
        data.parse_source(cfg.data.source)  # a wrong path or a too large batch fails before any model is built
        data.check_batch(cfg.data.source, cfg.train.batch_size, ui.world_size())
        check_teacher_names(dc.teachers)
        student = build_student(cfg)
        models: dict[str, nn.Module] = {}
        for i, name in enumerate(dc.teachers):
            if name not in models:  # the same teacher twice (Tc + T'c) is loaded once
                models[name] = build_teacher(name, cfg, i)
        self.teacher_models = models  # name in distill.teachers -> frozen model (build_method's input)
        self.model = build_method(student, models, dc)
        self._say_renormalised(models)
        self.frozen = list({id(m): m for m in self.model.teachers.values()}.values())
        # without a features target the student's last blocks/norm get no gradient: DDP must know
        self.find_unused_parameters = not any(t.kind == "features" for t in self.model.targets)

    def _say_renormalised(self, models: dict[str, nn.Module]) -> None:
        """One line per teacher (as the user named it) whose input statistics differ from the data's (e.g. a
        timm default tag's mean = std = 0.5, or CLIP's): its inputs are re-normalised."""
        if not ui.is_main_process():
            return
        given = {key: name for name, m in models.items() for key, tm in self.model.teachers.items() if tm is m}
        said = set()
        for key, (mean, std) in self.model.renormalised().items():
            name = given.get(key, key)
            if name not in said:
                said.add(name)
                ui.console.print(f"teacher {name!r} expects inputs normalised with mean {_fmt(mean)} and std "
                                 f"{_fmt(std)}: the ImageNet-normalised images are re-normalised for it", soft_wrap=True)

    def train_loader(self, *, rank: int, world_size: int, seed: int):
        return data.augmented_loader(self.cfg.data, self.cfg.train.batch_size, rank=rank,
                                     world_size=world_size, seed=seed)

    def loss(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        images = data.normalize(batch[0])  # uint8 -> float on the device (ImageNet statistics)
        out = model(images)
        return {"loss": out.loss, "loss_feat": out.loss_feat, "loss_rel": out.loss_rel,
                **{f"part/{k}": v for k, v in out.parts.items()}}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        from timm.models import save_for_hf

        # The student was trained on ImageNet-normalised inputs (METHOD.md), whatever its architecture's
        # default pretrained_cfg says (vit_base_patch16_224's augreg tag has mean = std = 0.5): record that,
        # so timm, `hd analyze` and a student reused as a teacher normalise its inputs correctly.
        cfg = {"pretrained_cfg": {"mean": data.IMAGENET_MEAN, "std": data.IMAGENET_STD, "tag": "hd_distill"}}
        save_for_hf(model.student, str(out_dir), model_config=cfg, safe_serialization=True)
