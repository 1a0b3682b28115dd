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

import time
from pathlib import Path

import torch
from torch import nn

from hdcli import data, ui
from hdcli.config import DistillConfig
from hdcli.config.distill import student_configs
from hdcli.errors import HDError
from hdcli.method import hybrid
from hdcli.method.heads import Decoder, save_decoder
from hdcli.method.models import build_student, build_teacher, check_teacher_names
from hdcli.method.signals import grad_shares
from hdcli.method.students import Students
from hdcli.models import vit
from hdcli.rundir import STUDENT
from hdcli.seeding import seed_all
from hdcli.teachers.registry import labels
from hdcli.train.task import Member, Task


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in v) + ")"


class DistillTask(Task):
    """``hd distill``: trains ``method.student`` + ``method.heads``; exports the student alone. With
    ``distill.students`` it trains several students from one teacher pass (``method.students.Students``), each a
    :class:`~hdcli.train.task.Member` with its own optimiser, records and export in ``<run>/students/<name>/``.

    Watching the run (``[eval]``, docs/distill.md): k-NN top-1 of the student(s) at the start, every
    ``eval.every`` steps (default each epoch) and at the end, of each teacher once at the start; a head-distance
    / NMI probe of the student(s) each evaluation; per-target signals on logged steps (``hdcli.watch``).
    """

    log_keys = ("loss", "loss_feat", "loss_rel")
    export_dir = STUDENT

    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg
        dc = cfg.distill
        # the data source, parsed once for the run; a wrong path or a too large batch fails before any model
        self.source = data.parse_source(cfg.data.source)
        data.check_batch(self.source, cfg.train.batch_size, ui.world_size())
        check_teacher_names(dc.teachers)
        cuda = torch.cuda.is_available() and not cfg.train.cpu
        dtype = hybrid.teacher_dtype(dc.teacher_dtype, "cuda" if cuda else "cpu")
        runs = student_configs(cfg) if dc.students is not None else [("", cfg)]  # (name, its own run's config)
        students, after = {}, {}
        for name, one in runs:
            seed_all(cfg.train.seed)  # each student (and its heads) as its own run builds it
            students[name] = build_student(one)
            after[name] = torch.get_rng_state()
        self.labels = dict(zip(dc.teachers, labels(dc.teachers), strict=True))  # name as given -> label in the logs
        models: dict[str, nn.Module] = {}
        for i, name in enumerate(dc.teachers):
            if name not in models:  # the same teacher twice (Tc + T'c) is loaded once; from a cache: not at all
                models[name] = build_teacher(name, cfg, i, meta=dc.targets_cache is not None)
        self.teacher_models = models  # name in distill.teachers -> frozen model (hybrid.build's input)
        self.monitor = self._monitor(cfg)
        self._t0, self._accelerator = time.perf_counter(), None
        methods = {}
        for name, one in runs:
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(after[name])  # the heads' draws follow the student's, as in its own run
                methods[name] = hybrid.build(students[name], models, one.distill, teacher_dtype=dtype)
        if dc.students is None:
            self.model = methods[""]
        else:
            self.model = Students(methods)
            self.members = [Member(name, methods[name], one.optim, f"students/{name}", config=one) for name, one in runs]
            self.log_keys = ("loss", *(f"{name}/loss" for name, _ in runs))
        if self.monitor is not None:  # the latest evaluation stays in the progress bar
            self.log_keys = (*self.log_keys, *(self._key(name, "knn/student_cls") for name, _ in runs))
        first = next(iter(methods.values()))
        self.cache = self._open_cache(cfg, first) if dc.targets_cache is not None else None
        if self.cache is None:
            self._say_renormalised(first)
        # without a features target the student's last blocks/norm get no gradient, and a student's attention-pool
        # head (SigLIP/PE style) never gets one: DDP must know
        self.find_unused_parameters = any(not any(t.kind == "features" for t in m.targets)
                                          or getattr(m.student, "attn_pool", None) is not None for m in methods.values())
        for name, one in runs:
            if self.monitor is not None and cfg.eval.probe_images and not all(map(vit.exposes_qk,
                                                                                  students[name].blocks)):
                raise HDError(f"the head-distance/NMI probe needs attention maps, which {one.student.arch}'s blocks "
                              "cannot expose", "set eval.probe_images = 0")

    def _open_cache(self, cfg: DistillConfig, method) -> dict:
        """The header of ``distill.targets_cache``, checked against this run: HDError naming the first difference
        of what defines the targets (teachers, targets, keep settings, image size, grid, data, ...)."""
        from hdcli.cache import layout
        from hdcli.cache.write import open_source

        cache = Path(cfg.distill.targets_cache).expanduser()
        header = layout.read_header(cache)
        mine = layout.describe(cfg, method, num_images=len(open_source(cfg)), views=header.get("views"),
                               dtype=header.get("dtype"))
        mine.pop("teacher_dtype")  # how the teachers ran when the cache was written: no teacher runs here
        diff = layout.first_difference({k: header.get(k) for k in mine}, mine)
        if diff:
            raise HDError(f"the target cache {cache} was written for another run ({diff})",
                          "train with the recipe and data it was written with, or write a cache for this run")
        self.cache_keys = {layout.source_name(src): src for src in method.teacher_pass.sources()}
        if ui.is_main_process():
            ui.info(f"targets from {cache}: {header['views']} views per image, {header['dtype']}; no teacher is loaded")
        return header

    @staticmethod
    def _key(member: str, key: str) -> str:
        """A record entry of one member (``<member>/<key>``; the key itself for a single student)."""
        return f"{member}/{key}" if member else key

    def methods(self, model: nn.Module) -> dict[str, nn.Module]:
        """member name -> its Distiller ("" -> the model itself for a single student)."""
        return dict(model.members) if self.members else {"": model}

    def _monitor(self, cfg: DistillConfig):
        """The k-NN monitor when the run evaluates (its eval source checked now), else None."""
        from hdcli.watch.monitor import KnnMonitor

        ec = cfg.eval
        if not ec.active(cfg.train.steps):
            return None
        source = self.source if ec.data is None else data.parse_source(ec.data)
        return KnnMonitor(source, img_size=cfg.data.img_size, samples=ec.samples, k=ec.k, temperature=ec.temperature,
                          seed=cfg.train.seed, probe_images=ec.probe_images, max_bad_fraction=cfg.data.max_bad_fraction,
                          num_workers=data.default_num_workers() if cfg.data.num_workers is None else cfg.data.num_workers)

    def _say_renormalised(self, method) -> None:
        """One line per teacher (as the user named it) whose input statistics differ from the data's (e.g. a
        timm default tag's mean = std = 0.5, or CLIP's): its inputs are re-normalised."""
        if not ui.is_main_process():
            return
        given = {label: name for name, label in self.labels.items()}
        for label, (mean, std) in method.teacher_pass.renormalised().items():
            ui.console.print(f"teacher {given[label]!r} expects inputs normalised with mean {_fmt(mean)} and std "
                             f"{_fmt(std)}: the ImageNet-normalised images are re-normalised for it", soft_wrap=True)

    def train_loader(self, *, rank: int, world_size: int, seed: int):
        if self.cache is not None:
            from hdcli.cache import read

            return read.loader(self.cfg, self.cfg.distill.targets_cache, self.cache, batch_size=self.cfg.train.batch_size,
                               rank=rank, world_size=world_size, seed=seed,
                               cuda=torch.cuda.is_available() and not self.cfg.train.cpu)
        return data.augmented_loader(self.cfg.data, self.cfg.train.batch_size, rank=rank, world_size=world_size,
                                     seed=seed, cuda=torch.cuda.is_available() and not self.cfg.train.cpu,
                                     source=self.source)

    def loss(self, model: nn.Module, batch, *, detail: bool = False) -> dict[str, torch.Tensor]:
        """The step's losses; on ``detail`` (logged) steps also the per-target signals and gradient shares. With
        several students: ``loss`` is their sum (each student's gradients are its own loss's), their own entries
        are ``<student>/loss``, ``<student>/part/...``."""
        images = data.normalize(batch[0])  # uint8 -> float on the device (ImageNet statistics)
        detail = detail and self.cfg.eval.signals
        if self.cache is not None:
            from hdcli.cache.read import targets_of

            outs = model(images, detail=detail, cached=targets_of(batch, self.cache_keys))
        else:
            outs = model(images, detail=detail)
        outs = outs if self.members else {"": outs}
        res = {"loss": sum(o.loss for o in outs.values())} if self.members else {}
        methods = self.methods(self.model)
        for name, out in outs.items():
            own = {"loss": out.loss, "loss_feat": out.loss_feat, "loss_rel": out.loss_rel,
                   **{f"part/{k}": v for k, v in out.parts.items()}, **{f"drop/{k}": v for k, v in out.dropped.items()}}
            if detail:  # cosine / attention agreement, and each target's share of the gradient at the shared block
                m = methods[name]
                own.update(out.signals)
                weighted = {t.name: t.weight * out.parts[t.name] for t in m.targets}
                scaler = getattr(self._accelerator, "scaler", None)  # fp16: shares of the scaled losses
                scale = float(scaler.get_scale()) if scaler is not None else 1.0
                own.update({f"share/{k}": v for k, v in grad_shares(weighted, m.shared_parameters(), scale).items()})
            res.update({self._key(name, k): v for k, v in own.items()})
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
        if self.cache is not None:
            ui.info("the teachers' k-NN is not evaluated: a run from a target cache has no teacher")
        for label, tm in ({} if self.cache is not None else model.teachers).items():
            res.update(self.monitor.evaluate(label, lambda x, label=label, tm=tm: token_features(tm, model.teacher_input(label, x)),
                                             accelerator))
        return {**res, **self.evaluate(model, accelerator, -1, 0)}

    def evaluate(self, model: nn.Module, accelerator, epoch: int, step: int) -> dict[str, float] | None:
        from hdcli.watch.monitor import token_features

        if self.monitor is None:
            return None
        model.eval()
        before = self.monitor.seconds
        res = {}
        for name, m in self.methods(model).items():
            own = self.monitor.evaluate("student", lambda x, s=m.student: token_features(s, x), accelerator)
            if accelerator.is_main_process:
                own.update(self.monitor.probe(m.student, accelerator.device))
            res.update({self._key(name, k): v for k, v in own.items()})
        self.monitor.last_seconds = self.monitor.seconds - before  # what the next one will cost (eval_at)
        return res

    def export(self, model: nn.Module, out_dir: Path) -> None:
        from timm.models import save_for_hf

        # The student was trained on ImageNet-normalised inputs (METHOD.md), whatever its architecture's
        # default pretrained_cfg says (vit_base_patch16_224's augreg tag has mean = std = 0.5): record that,
        # so timm, `hd analyze` and a student reused as a teacher normalise its inputs correctly.
        cfg = {"pretrained_cfg": {"mean": data.IMAGENET_MEAN, "std": data.IMAGENET_STD, "tag": "hd_distill"}}
        save_for_hf(model.student, str(out_dir), model_config=cfg, safe_serialization=True)
        for key, head in model.heads.items():  # an asymmetric decoder (paper Sec. 2), for hd analyze: not the student
            if isinstance(head, Decoder):
                save_decoder(head, out_dir / "decoder" / key)

    def export_member(self, model: nn.Module, name: str, out_dir: Path) -> None:
        self.export(model.members[name], out_dir)
