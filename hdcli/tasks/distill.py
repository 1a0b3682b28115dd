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

import os
import re
import time
from pathlib import Path

import torch
from torch import nn

from hdcli import data, teachers, ui
from hdcli.config import DistillConfig
from hdcli.errors import HDError
from hdcli.models import vit
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


def teacher_label(name: str) -> str:
    """A short name of a teacher for the logs (``knn/<label>_cls``): a local dir's name (its run's, for a run's
    ``student/``), a ``random:`` teacher's architecture, otherwise the name itself; no '/' or '.'."""
    if name.startswith("local-dir:") or os.sep in name:
        p = Path(name.removeprefix("local-dir:")).expanduser()
        name = p.parent.name if p.name == STUDENT and p.parent.name else p.name
    return teacher_key(name, 0)


def build_method(student: nn.Module, models: dict[str, nn.Module], dc) -> nn.Module:
    """From the ``[distill]`` section: HybridDistill (empty ``targets``, two teachers), the hybrid with several
    feature teachers (empty ``targets``, three or more), or the general Distiller (``targets``)."""
    from hdcli.method import Distiller, HybridDistill, Target

    s_rel = None if dc.student_relation_blocks is None else tuple(dc.student_relation_blocks)
    if not dc.targets and len(dc.teachers) == 2:
        return HybridDistill(
            student, models[dc.teachers[0]], models[dc.teachers[1]],
            relation_blocks=tuple(dc.relation_blocks), mask_blocks=tuple(dc.mask_blocks),
            drop_ratio=dc.drop_ratio, alpha=dc.alpha, beta=dc.beta, masking=dc.masking,
            relation_heads=dc.relation_heads, student_relation_blocks=s_rel, target_norm=dc.target_norm)
    names = list(models)
    keys = {name: teacher_key(name, i) for i, name in enumerate(names)}
    if len(set(keys.values())) != len(keys):
        keys = {name: f"teacher{i}" for i, name in enumerate(names)}
    if dc.targets:
        targets = [Target(teacher=keys[t["teacher"]], kind=t["kind"], blocks=tuple(t.get("blocks", ())),
                          weight=float(t.get("weight", 1.0)),
                          student_blocks=None if t.get("student_blocks") is None else tuple(t["student_blocks"]),
                          name=t.get("name"),
                          norm=t.get("norm", dc.target_norm if t["kind"] != "relations" else "layernorm"),
                          registers=bool(t.get("registers", False)), pooled=bool(t.get("pooled", True)))
                   for t in dc.targets]
    else:  # the hybrid with several feature teachers: MIM relations (weight alpha) + each teacher's features
        mim, *feature = dc.teachers
        targets = [Target(keys[mim], "relations", tuple(dc.relation_blocks), dc.alpha, s_rel),
                   *(Target(keys[f], "features", norm=dc.target_norm) for f in feature)]
    needs_mask = dc.masking in ("progressive", "direct") and dc.drop_ratio > 0
    mask_teacher = dc.mask_teacher or (dc.teachers[0] if needs_mask else None)
    return Distiller(student, {keys[n]: m for n, m in models.items()}, targets,
                     mask_teacher=keys[mask_teacher] if mask_teacher else None, mask_blocks=tuple(dc.mask_blocks),
                     drop_ratio=dc.drop_ratio, masking=dc.masking, beta=dc.beta, relation_heads=dc.relation_heads)


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in v) + ")"


class DistillTask(Task):
    """``hd distill``: trains ``method.student`` + ``method.heads``; exports the student alone.

    Watching the run (``[eval]``, docs/distill.md): k-NN top-1 of the student at the start, every
    ``eval.every`` steps (default each epoch) and at the end, of each teacher once at the start; a head-distance
    / NMI probe of the student each evaluation; per-target signals on logged steps (``hdcli.watch``).
    """

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
        self.monitor = self._monitor(cfg)
        self._t0, self._accelerator = time.perf_counter(), None
        if self.monitor is not None:
            self.log_keys = (*self.log_keys, "knn/student_cls")  # the latest evaluation stays in the progress bar
        self.model = build_method(student, models, dc)
        self._say_renormalised(models)
        self.frozen = list({id(m): m for m in self.model.teachers.values()}.values())
        # without a features target the student's last blocks/norm get no gradient, and a student's attention-pool
        # head (SigLIP/PE style) never gets one: DDP must know
        self.find_unused_parameters = (not any(t.kind == "features" for t in self.model.targets)
                                       or getattr(student, "attn_pool", None) is not None)
        if self.monitor is not None and cfg.eval.probe_images and not all(map(vit.exposes_qk, student.blocks)):
            raise HDError(f"the head-distance/NMI probe needs attention maps, which {cfg.student.arch}'s blocks "
                          "cannot expose", "set eval.probe_images = 0")

    @staticmethod
    def _monitor(cfg: DistillConfig):
        """The k-NN monitor when the run evaluates (its eval source checked now), else None."""
        from hdcli.watch.monitor import KnnMonitor

        ec = cfg.eval
        if not ec.active(cfg.train.steps):
            return None
        source = ec.data if ec.data is not None else cfg.data.source
        data.parse_source(source)
        return KnnMonitor(source, img_size=cfg.data.img_size, samples=ec.samples, k=ec.k, temperature=ec.temperature,
                          seed=cfg.train.seed, probe_images=ec.probe_images,
                          num_workers=data.default_num_workers() if cfg.data.num_workers is None else cfg.data.num_workers)

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
                                     world_size=world_size, seed=seed,
                                     cuda=torch.cuda.is_available() and not self.cfg.train.cpu)

    def loss(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        from hdcli.watch.signals import grad_shares

        images = data.normalize(batch[0])  # uint8 -> float on the device (ImageNet statistics)
        detail = self.detail and self.cfg.eval.signals
        self.model.detail = detail
        out = model(images)
        res = {"loss": out.loss, "loss_feat": out.loss_feat, "loss_rel": out.loss_rel,
               **{f"part/{k}": v for k, v in out.parts.items()}}
        if detail:  # logged steps only: cosine / attention agreement, and each target's gradient share
            res.update(out.signals)
            weighted = {t.name: t.weight * out.parts[t.name] for t in self.model.targets}
            res.update({f"share/{k}": v for k, v in grad_shares(weighted, self.model.shared_parameters()).items()})
        return res

    # -- watching the run (hdcli.watch)

    def eval_at(self, done: int, *, n_steps: int, epoch_end: bool) -> bool:
        """``eval.every`` steps, or each epoch's end while the evaluations stay within ``eval.max_share`` of the
        wall time (rank 0 decides for all); always the last step."""
        if self.monitor is None:
            return False
        every = self.cfg.eval.every
        if done == n_steps or every is not None:
            return done == n_steps or done % every == 0
        if not epoch_end:
            return False
        spent, elapsed = self.monitor.seconds, time.perf_counter() - self._t0
        want = spent + self.monitor.last_seconds <= self.cfg.eval.max_share * elapsed
        if self._accelerator is not None and self._accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            want = bool(broadcast(torch.tensor([float(want)], device=self._accelerator.device), from_process=0).item())
        return want

    def begin(self, model: nn.Module, accelerator, start: int) -> dict[str, float] | None:
        """At step 0: k-NN of each teacher (once per run) and of the initial student."""
        from hdcli.watch.monitor import token_features

        self._t0, self._accelerator = time.perf_counter(), accelerator
        if self.monitor is None or start > 0:
            return None
        res: dict[str, float] = {}
        labels = [teacher_label(name) for name in self.teacher_models]
        if len(set(labels)) != len(labels):
            labels = [teacher_key(name, i) for i, name in enumerate(self.teacher_models)]
        names = {id(m): label for label, m in zip(labels, self.teacher_models.values(), strict=True)}
        for key, tm in model.teachers.items():
            res.update(self.monitor.evaluate(names.get(id(tm), key),
                                             lambda x, key=key, tm=tm: token_features(tm, model.teacher_input(key, x)),
                                             accelerator))
        return {**res, **self.evaluate(model, accelerator, -1, 0)}

    def evaluate(self, model: nn.Module, accelerator, epoch: int, step: int) -> dict[str, float] | None:
        from hdcli.watch.monitor import token_features

        if self.monitor is None:
            return None
        model.eval()
        before = self.monitor.seconds
        res = self.monitor.evaluate("student", lambda x: token_features(model.student, x), accelerator)
        if accelerator.is_main_process:
            res.update(self.monitor.probe(model.student, accelerator.device))
        self.monitor.last_seconds = self.monitor.seconds - before  # what the next one will cost (eval_at)
        return res

    def export(self, model: nn.Module, out_dir: Path) -> None:
        from timm.models import save_for_hf

        # The student was trained on ImageNet-normalised inputs (METHOD.md), whatever its architecture's
        # default pretrained_cfg says (vit_base_patch16_224's augreg tag has mean = std = 0.5): record that,
        # so timm, `hd analyze` and a student reused as a teacher normalise its inputs correctly.
        cfg = {"pretrained_cfg": {"mean": data.IMAGENET_MEAN, "std": data.IMAGENET_STD, "tag": "hd_distill"}}
        save_for_hf(model.student, str(out_dir), model_config=cfg, safe_serialization=True)
