"""The models of a distillation config: the student (random, or initialised from a pretrained model of its
architecture, partly frozen) and the frozen teachers (loaded, ``random:ARCH`` for smoke runs, or their
architecture alone on the meta device for a run from a target cache). Shared by ``hd distill`` and
``hd cache-targets``; reads the config's fields, imports no config."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from hdcli import teachers
from hdcli.errors import HDError
from hdcli.models import vit
from hdcli.models.features import as_teacher
from hdcli.teachers.registry import HF, OPENCLIP, PY, RANDOM, random_arch
from hdcli.teachers.sources import py_callable


def check_teacher_names(names: list[str]) -> None:
    """Resolve every teacher name now (cheap), so typos fail before any model is built; one teacher under two
    spellings (``local-dir:/x/clip`` and ``/x/clip/``, ``mae`` and its timm tag) is refused: its targets would
    count twice."""
    seen: dict[str, str] = {}
    for name in names:
        if name.startswith(RANDOM):
            random_arch(name)  # a malformed name is an error now
            identity = name
        else:
            spec = teachers.resolve(name)
            identity = spec.tag  # a directory: its resolved path
            if spec.tag.startswith(PY):
                py_callable(spec)  # importable, before any model is built
            elif spec.tag.startswith(HF):
                from hdcli.models.hf import transformers

                transformers()  # the extra is installed
            elif spec.tag.startswith(OPENCLIP):
                from hdcli.models.openclip import open_clip

                open_clip()
        if identity in seen and seen[identity] != name:
            raise HDError(f"teachers {seen[identity]!r} and {name!r} are one teacher ({identity.removeprefix('local-dir:')})",
                          "list it once")
        seen[identity] = name


def build_student(cfg) -> nn.Module:
    """The student: ``student.arch`` randomly initialised, or with the weights of ``student.init`` (a pretrained
    model of the same architecture), the embeddings and first ``student.freeze_blocks`` blocks and the
    ``student.freeze`` patterns frozen."""
    s = cfg.student
    model = teachers.create(s.arch, pretrained=False, num_classes=0, img_size=cfg.data.img_size,
                            patch_size=s.patch_size, drop_path_rate=s.drop_path, **s.kwargs)
    vit.check_vit(model, "the student")
    vit.check_student(model, cfg.data.img_size)
    if s.init != "random":
        with torch.random.fork_rng(devices=[]):  # loading draws nothing from the run's random state
            teachers.init_from(model, s.init)
    vit.freeze(model, s.freeze_blocks, s.freeze)
    return model


def build_teacher(name: str, cfg, index: int, *, meta: bool = False) -> nn.Module:
    """A frozen, eval-mode teacher; ``random:ARCH`` ones seeded by their position in the list only. Building a
    teacher leaves the global random state as it was: the student and its heads are drawn from the run's seed
    alone, whichever teachers the run loads (and each of several students as in its own run). ``meta``: its
    architecture only, on the meta device (no weights read or memory used: a run from a target cache)."""
    with torch.random.fork_rng(devices=[]):
        if name.startswith(RANDOM):
            kwargs = {"img_size": cfg.data.img_size, **cfg.distill.teacher_kwargs, "num_classes": 0}
            arch, seed = random_arch(name)
            torch.manual_seed(1000 + index if seed is None else seed)
            with torch.device("meta") if meta else nullcontext():
                model = teachers.create(arch, pretrained=False, **kwargs)
            return as_teacher(model).requires_grad_(False).eval()
        if meta and not teachers.resolve(name).tag.startswith((HF, PY, OPENCLIP)):
            with torch.device("meta"):
                return as_teacher(teachers.create(teachers.resolve(name).tag, num_classes=0)
                                           ).requires_grad_(False).eval()
        return teachers.load(name, mean=cfg.distill.teacher_mean, std=cfg.distill.teacher_std)
