"""The teacher registry: short names -> timm tags and roles (torch-free, no timm import)."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hdcli.errors import HDError, closest, did_you_mean
from hdcli.rundir import STUDENT

if TYPE_CHECKING:
    pass

ROLES = ("mim", "feature")
MANIFEST = "teachers.json"
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
HF = "hf:"  # hf:DIR or hf:ORG/NAME: a Hugging Face Transformers vision model (hdcli.models.hf)
PY = "py:"  # py:module:callable: a lab's own features-only teacher (hdcli.models.features)
OPENCLIP = "openclip:"  # openclip:ARCH:FILE: an OpenCLIP vision tower and its checkpoint (hdcli.models.openclip)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for in a hub repo, in order



@dataclass(frozen=True)
class TeacherSpec:
    """A teacher as the user named it: ``name`` (as given), ``tag`` (what timm loads), ``role``.

    ``role`` is "mim" (relations + keep sets come from it), "feature" (final features), or None
    for anything outside the registry (the recipe then says what it is used for).
    """

    name: str
    tag: str
    role: str | None = None
    family: str = ""  # docs/teachers.md: "ViT", "ViT, no CLS", "Eva (RoPE)"
    prefix: str = ""  # its prefix tokens: "CLS", "CLS + 4 reg", "none (MAP head)"
    stats: str = ""  # the input mean/std of its pretrained_cfg: "imagenet", "clip" or "0.5"


# Paper Sec. 4.1 / METHOD.md defaults, then today's feature teachers (docs/teachers.md). OpenAI CLIP was
# trained with QuickGELU, hence the quickgelu tags.
REGISTRY: dict[str, TeacherSpec] = {
    "mae": TeacherSpec("mae", "vit_base_patch16_224.mae", "mim", "ViT", "CLS", "imagenet"),
    "mae-l": TeacherSpec("mae-l", "vit_large_patch16_224.mae", "mim", "ViT", "CLS", "imagenet"),
    "clip": TeacherSpec("clip", "vit_base_patch16_clip_quickgelu_224.openai", "feature", "ViT", "CLS", "clip"),
    "clip-l": TeacherSpec("clip-l", "vit_large_patch14_clip_quickgelu_224.openai", "feature", "ViT", "CLS", "clip"),
    "deit": TeacherSpec("deit", "deit_base_patch16_224.fb_in1k", "feature", "ViT", "CLS", "imagenet"),
    "dinov2": TeacherSpec("dinov2", "vit_base_patch14_dinov2.lvd142m", "feature", "ViT", "CLS", "imagenet"),
    "dinov2-reg": TeacherSpec("dinov2-reg", "vit_base_patch14_reg4_dinov2.lvd142m", "feature", "ViT", "CLS + 4 reg",
                              "imagenet"),
    "dinov3": TeacherSpec("dinov3", "vit_base_patch16_dinov3.lvd1689m", "feature", "Eva (RoPE)", "CLS + 4 reg",
                          "imagenet"),
    "dinov3-l": TeacherSpec("dinov3-l", "vit_large_patch16_dinov3.lvd1689m", "feature", "Eva (RoPE)", "CLS + 4 reg",
                            "imagenet"),
    "siglip2": TeacherSpec("siglip2", "vit_base_patch16_siglip_224.v2_webli", "feature", "ViT", "none (MAP head)",
                           "0.5"),
    "eva02-clip": TeacherSpec("eva02-clip", "eva02_base_patch16_clip_224.merged2b", "feature", "Eva (RoPE)", "CLS",
                              "clip"),
    "pe": TeacherSpec("pe", "vit_pe_core_base_patch16_224.fb", "feature", "Eva (RoPE)", "CLS (+ MAP head)", "0.5"),
    # Transformers checkpoints (the extra hdcli[hf]); their statistics come from the repo's image processor
    "hf-mae": TeacherSpec("hf-mae", "hf:facebook/vit-mae-base", "mim", "Transformers ViTMAE", "CLS", "imagenet"),
    "hf-dinov2": TeacherSpec("hf-dinov2", "hf:facebook/dinov2-base", "feature", "Transformers DINOv2", "CLS",
                             "imagenet"),
    "hf-siglip2": TeacherSpec("hf-siglip2", "hf:google/siglip2-base-patch16-224", "feature", "Transformers SigLIP",
                              "none (MAP head)", "0.5"),
}
STATS = {  # what TeacherSpec.stats stands for (mean, std); tests/test_teachers.py checks them against timm
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "0.5": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

# The hub repos timm's pretrained_cfg names for the registry tags (the quickgelu CLIP tags share the
# plain CLIP repos). Kept here so that cache checks (`--list`, `--offline`, the no-network probe) need
# no timm import; tests/test_teachers.py checks them against timm.
REGISTRY_HUB_IDS: dict[str, str] = {
    "mae": "timm/vit_base_patch16_224.mae",
    "mae-l": "timm/vit_large_patch16_224.mae",
    "clip": "timm/vit_base_patch16_clip_224.openai",
    "clip-l": "timm/vit_large_patch14_clip_224.openai",
    "deit": "timm/deit_base_patch16_224.fb_in1k",
    "dinov2": "timm/vit_base_patch14_dinov2.lvd142m",
    "dinov2-reg": "timm/vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov3": "timm/vit_base_patch16_dinov3.lvd1689m",
    "dinov3-l": "timm/vit_large_patch16_dinov3.lvd1689m",
    "siglip2": "timm/vit_base_patch16_siglip_224.v2_webli",
    "eva02-clip": "timm/eva02_base_patch16_clip_224.merged2b",
    "pe": "timm/vit_pe_core_base_patch16_224.fb",
    "hf-mae": "facebook/vit-mae-base",
    "hf-dinov2": "facebook/dinov2-base",
    "hf-siglip2": "google/siglip2-base-patch16-224",
}


def names() -> list[str]:
    """The registry's short names, in registry order."""
    return list(REGISTRY)


# ----------------------------------------------------------------------------------------------------------
# resolving names


def resolve(name: str | TeacherSpec) -> TeacherSpec:
    """Map what the user wrote to a :class:`TeacherSpec`.

    Accepted: a registry short name (case-insensitive); ``local-dir:PATH`` or a plain directory
    holding ``config.json`` + weights (timm's ``save_for_hf`` layout, e.g. a run's ``student/``);
    ``hf-hub:ORG/NAME``; any timm model name with or without a pretrained tag.
    """
    if isinstance(name, TeacherSpec):
        return name
    raw = str(name).strip()
    if not raw:
        raise HDError("empty teacher name", f"use one of: {', '.join(names())}, a timm tag or a directory")
    if raw.lower() in REGISTRY:
        return REGISTRY[raw.lower()]
    if raw.startswith(HF_HUB):
        return TeacherSpec(raw, raw, None)
    if raw.startswith(HF):
        return TeacherSpec(raw, _hf_tag(raw), None, "Transformers")
    if raw.startswith(OPENCLIP):
        arch, _, file = raw[len(OPENCLIP):].partition(":")
        if not arch or not file:
            raise HDError(f"{raw!r} names no checkpoint", "write openclip:ARCH:FILE, e.g. openclip:ViT-B-16:/ckpt/open_clip_model.safetensors")
        path = Path(file).expanduser()
        if not path.is_file():
            raise HDError(f"the OpenCLIP checkpoint {path} does not exist", "give the file of the tower's weights")
        return TeacherSpec(raw, f"{OPENCLIP}{arch}:{path.resolve()}", None, "OpenCLIP")
    if raw.startswith(PY):
        module, _, fn = raw[len(PY):].rpartition(":")
        if not module or not fn.isidentifier():
            raise HDError(f"{raw!r} names no callable", "write py:MODULE:CALLABLE, e.g. py:my_lab.teachers:build")
        return TeacherSpec(raw, raw, None, "callable")
    # timm names never hold a path separator; anything path-like must be a model directory
    if raw.startswith((LOCAL_DIR, ".", "~")) or "/" in raw or os.sep in raw or Path(raw).is_dir():
        path = Path(raw[len(LOCAL_DIR):] if raw.startswith(LOCAL_DIR) else raw).expanduser()
        if not path.is_dir():
            raise HDError(f"teacher directory {path} does not exist",
                          "give a directory holding model.safetensors + config.json (timm's save_for_hf layout)")
        if not (path / "config.json").is_file():
            raise HDError(f"{path} has no config.json, so timm cannot tell which model it holds",
                          "a run's student/ directory or timm's save_for_hf output has one")
        return TeacherSpec(raw, LOCAL_DIR + str(path.resolve()), None)
    return TeacherSpec(raw, _check_timm_tag(raw), None)


RANDOM = "random:"  # random:ARCH[@SEED]: a randomly initialised, frozen teacher (smoke runs, tests, benchmarks)


def random_arch(name: str) -> tuple[str, int | None]:
    """``random:ARCH[@SEED]`` -> (ARCH, SEED or None). Two random teachers of one architecture are two teachers
    when their seeds differ (``random:vit_small_patch16_224,random:vit_small_patch16_224@1``); without a seed a
    teacher's weights come from its position in the list."""
    arch, at, seed = name.removeprefix(RANDOM).partition("@")
    if not arch:
        raise HDError(f"{name!r} names no architecture", "e.g. random:vit_base_patch16_224.mae")
    if at and not seed.isdigit():
        raise HDError(f"{name!r}: the seed after @ must be a non-negative integer", "e.g. random:vit_small_patch16_224@1")
    return arch, int(seed) if at else None


def label(name: str) -> str:
    """How a teacher appears in target and metric names (``part/<label>/<kind>``, ``knn/<label>_cls``): the same
    label for the same teacher however it is spelled. A registry name, or the registry name whose tag a timm tag
    or a ``random:ARCH`` names (``random:vit_base_patch16_224.mae`` -> ``mae``); a directory's name (its run's
    name for a run's ``student/``); otherwise the tag or architecture. Only letters, digits, ``_`` and ``-``."""
    raw = str(name).strip()
    if raw.startswith(RANDOM):
        arch, seed = random_arch(raw)
        return label(arch) if seed is None else f"{label(arch)}-seed{seed}"
    if raw.lower() in REGISTRY:
        return raw.lower()
    by_tag = {spec.tag: short for short, spec in REGISTRY.items()}
    if raw in by_tag:
        return by_tag[raw]
    if raw.startswith(OPENCLIP):  # its architecture
        raw = raw[len(OPENCLIP):].partition(":")[0]
    elif raw.startswith(PY):  # module and callable
        raw = raw[len(PY):]
    elif raw.startswith(LOCAL_DIR) or "/" in raw or os.sep in raw:
        path = Path(raw.removeprefix(LOCAL_DIR)).expanduser()
        raw = path.parent.name if path.name == STUDENT and path.parent.name else path.name
    return re.sub(r"[^A-Za-z0-9_-]+", "_", raw.removeprefix(HF_HUB)).strip("_") or "teacher"


def labels(teachers: list[str]) -> list[str]:
    """:func:`label` of each teacher (the same for a repeated name); a label that a second, different teacher
    would share gets ``-2`` (then ``-3``, ...) in order of first appearance."""
    given: dict[str, str] = {}
    for t in teachers:
        if t not in given:
            base, k = label(t), 1
            while (base if k == 1 else f"{base}-{k}") in given.values():
                k += 1
            given[t] = base if k == 1 else f"{base}-{k}"
    return [given[t] for t in teachers]


def _hf_tag(raw: str) -> str:
    """``hf:`` + a resolved directory, or ``hf:`` + a hub repo id (ORG/NAME)."""
    target = raw[len(HF):]
    path = Path(target).expanduser()
    if path.is_dir():
        return HF + str(path.resolve())
    if target.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", target):
        raise HDError(f"{raw!r} is neither a directory nor a hub repo (ORG/NAME)",
                      "give hf:DIR (a save_pretrained directory) or hf:ORG/NAME, e.g. hf:facebook/vit-mae-base")
    return HF + target


def hf_dir(tag: str) -> Path | None:
    """The directory of an ``hf:`` tag, or None for a hub repo."""
    target = tag[len(HF):]
    return Path(target) if target.startswith("/") else None


def _unknown(tag: str, near: list[str]) -> HDError:
    return HDError(f"unknown teacher '{tag}': not in the registry ({', '.join(names())}) and not a timm model",
                   f"did you mean: {', '.join(near)}? `hd fetch-teachers --list` shows the registry")


def _check_timm_tag(tag: str) -> str:
    """``tag`` if timm knows the model (and its pretrained tag, when one is given), else an HDError."""
    if not re.fullmatch(r"\w+(\.[\w-]+)?", tag):  # timm names are [a-z0-9_]+(.[a-z0-9_]+): no timm import needed
        raise _unknown(tag, closest(tag, names()))
    import timm
    from timm.models import split_model_name_tag

    arch, pretrained_tag = split_model_name_tag(tag)
    if not timm.is_model(arch):
        raise _unknown(tag, closest(tag, names()) + difflib.get_close_matches(arch, timm.list_models(), n=2,
                                                                               cutoff=0.85))
    tags = timm.list_pretrained(f"{arch}.*") if pretrained_tag else []
    if pretrained_tag and tag not in tags:
        raise HDError(f"timm has no pretrained weights '{tag}'",
                      (did_you_mean(tag, tags) if tags else f"{arch} has no pretrained tags in timm"))
    return tag


# ----------------------------------------------------------------------------------------------------------
# the hub cache


