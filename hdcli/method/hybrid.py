"""The paper's Hybrid Distill (Sec. 3) and the one builder of a method from a ``[distill]`` config section.

The loss (paper Eq. 3; METHOD.md "Loss"), over CLS + the kept tokens T' chosen from the MIM teacher's blocks
``mask_blocks`` (Eq. 4):

    L = L_feat + α · L_rel
    L_feat = SmoothL1_β( h(x_S^L),  LN(x_T^L) )                          feature teacher T, head h
    L_rel  = 1/|B| Σ_{i ∈ B} SmoothL1_β( q_S^i k_S^iᵀ,  q_M^i k_M^iᵀ )     MIM teacher M, relation blocks B

Every spelling of a method becomes a list of :class:`~hdcli.method.targets.Target` in :func:`targets_from_config`:
two teachers (the paper), more teachers (MIM relations + each further teacher's features) or explicit
``[[distill.targets]]``. A teacher is named by its label (``hdcli.teachers.registry.label``: ``mae``, ``clip``,
a run dir's name, ...) and a target ``<label>/<kind>``, so the same method logs the same names however it is
written (docs/distill.md "Metric names").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from hdcli.errors import HDError, did_you_mean
from hdcli.method.distiller import Distiller, check_reconstruction
from hdcli.method.heads import decoder_spec
from hdcli.method.losses import BETA
from hdcli.method.masking import Masking, Reconstruction
from hdcli.method.names import paper_blocks
from hdcli.method.norms import NORMS
from hdcli.method.targets import TARGET_KEYS, Target
from hdcli.models import vit
from hdcli.teachers.registry import RANDOM, labels


class HybridDistill(Distiller):
    """Hybrid Distill: the features of ``feat_teacher`` (CLIP or DeiT) after its final norm, plus ``alpha`` × the
    relations q·kᵀ of ``mim_teacher`` (MAE) entering ``relation_blocks``, the student seeing CLS + the tokens kept
    by progressive redundant-token masking of the MIM teacher (``out.loss_feat`` + ``out.loss_rel``, α applied).

    ``relation_blocks``/``mask_blocks`` default to the paper's for the MIM teacher's depth (9, 10 / 0, 4, 8 at
    depth 12; ``names.paper_blocks``); ``student_relation_blocks`` to ``relation_blocks``. ``names``: the two
    teachers' names (targets ``"<feature>/features"`` and ``"<mim>/relations"``); ``target_norm``: how the
    features are normalised (``hdcli.method.norms``; the paper's LayerNorm by default).
    """

    def __init__(self, student: nn.Module, mim_teacher: nn.Module, feat_teacher: nn.Module,
                 relation_blocks: Sequence[int] | None = None, mask_blocks: Sequence[int] | None = None,
                 drop_ratio: float = 0.3, alpha: float = 1.0, beta: float = BETA, masking: str = "progressive",
                 relation_heads: str = "match", student_relation_blocks: Sequence[int] | None = None,
                 target_norm: str = "layernorm", names: tuple[str, str] = ("mim", "feature")):
        paper = paper_blocks(vit.depth(mim_teacher))
        mim, feature = names
        targets = [Target(feature, "features", norm=target_norm),
                   Target(mim, "relations", tuple(relation_blocks or paper.relations), alpha,
                          None if student_relation_blocks is None else tuple(student_relation_blocks))]
        super().__init__(student, {mim: mim_teacher, feature: feat_teacher}, targets, mask_teacher=mim,
                         mask_blocks=tuple(paper.mask if mask_blocks is None else mask_blocks),
                         drop_ratio=drop_ratio, masking=masking, beta=beta, relation_heads=relation_heads)

    @property
    def feature_head(self) -> nn.Module:
        """The head applied to the student's final features (student width -> feature-teacher width)."""
        return self.head(self.targets[0].name)


# ---------------------------------------------------------------- the one builder from the config

def masking_of(dc) -> Masking:
    """The keep-set settings of a ``[distill]`` section."""
    return Masking(dc.masking, dc.drop_ratio, tuple(dc.mask_blocks))


def reconstruction_of(dc) -> Reconstruction | None:
    """The mask feature reconstruction settings of a ``[distill]`` section (None: off, the paper's method)."""
    return Reconstruction(dc.mask_ratio, dc.mask_block) if dc.mask_reconstruction else None


def targets_from_config(dc) -> tuple[list[Target], str | None]:
    """A ``[distill]`` section (``hdcli.config.MethodConfig``) as targets over the teachers' labels, and the mask
    teacher's label (None when no teacher chooses the keep set). Raises HDError naming the entry at fault: this
    is the config's validation of its targets (``MethodConfig.validate`` calls it) and the builder's input."""
    if dc.target_norm not in NORMS:
        raise HDError(f"distill.target_norm must be one of {', '.join(NORMS)}; got {dc.target_norm!r}",
                      did_you_mean(str(dc.target_norm), NORMS))
    label = dict(zip(dc.teachers, labels(list(dc.teachers)), strict=True))
    if dc.targets:
        targets = [_target(t, label, dc, f"distill.targets[{i}]") for i, t in enumerate(dc.targets)]
    else:  # the hybrid: relations of the MIM teacher (teachers[0], weight alpha) + each further teacher's features
        for i, name in enumerate(dc.teachers):
            if name in dc.teachers[:i]:
                raise HDError(f"teacher {name!r} is listed twice in distill.teachers", "list it once (the hybrid takes "
                              "the relations of the first teacher and the features of each further one)"
                              + ("; two random teachers of one architecture need seeds: random:ARCH@1"
                                 if name.startswith(RANDOM) else ""))
        mim, *feature = dc.teachers
        s_rel = None if dc.student_relation_blocks is None else tuple(dc.student_relation_blocks)
        targets = [Target(label[mim], "relations", tuple(dc.relation_blocks), dc.alpha, s_rel),
                   *(Target(label[f], "features", norm=dc.target_norm, head=decoder_spec(dc.decoder)) for f in feature)]
    names = [t.name for t in targets]
    for name in names:
        if names.count(name) > 1:
            raise HDError(f"two distillation targets are named {name!r}",
                          "give one of them a name: [[distill.targets]] name = \"...\" (a teacher listed twice in "
                          "--teachers gives its features twice: list it once)")
    decoder_spec(dc.decoder)  # a decoder and the mask settings are checked even where unused
    Reconstruction(dc.mask_ratio, dc.mask_block)
    if dc.mask_reconstruction:
        check_reconstruction(targets, keep_set=dc.masking != "none")
    mask_teacher = dc.mask_teacher or dc.teachers[0]
    mask_label = label[mask_teacher] if masking_of(dc).needs_teacher else None
    used = {t.teacher for t in targets} | {mask_label}
    for name in dc.teachers:
        if label[name] not in used:
            raise HDError(f"teacher {name!r} is used by no target" + (" (and masking does not look at it)"
                                                                       if dc.targets else ""),
                          "drop it from distill.teachers, or add a [[distill.targets]] entry for it")
    return targets, mask_label


def _target(entry: dict, label: Mapping[str, str], dc, where: str) -> Target:
    for k in entry:
        if k not in TARGET_KEYS:
            raise HDError(f"unknown key {where}.{k}", did_you_mean(k, TARGET_KEYS))
    for k in ("teacher", "kind"):
        if k not in entry:
            raise HDError(f"{where} needs a {k!r}", "e.g. {teacher = \"clip\", kind = \"features\"}")
    if entry["teacher"] not in label:
        raise HDError(f"{where}.teacher {entry['teacher']!r} is not one of distill.teachers {list(dc.teachers)}",
                      did_you_mean(str(entry["teacher"]), list(label)))
    for flag in ("registers", "pooled"):
        if not isinstance(entry.get(flag, False), bool):
            raise HDError(f"{where}.{flag} must be true or false, got {entry[flag]!r}")
    w = entry.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
        raise HDError(f"{where}.weight must be a finite number ≥ 0, got {w!r}")
    kw = dict(entry, teacher=label[entry["teacher"]], weight=float(w))
    if "norm" not in entry and entry["kind"] != "relations":
        kw["norm"] = dc.target_norm  # the section's default for feature-like targets
    if "head" not in entry and entry["kind"] == "features" and not entry.get("student_blocks"):
        kw["head"] = decoder_spec(dc.decoder)  # the section's decoder for the final features
    try:
        return Target(**kw)
    except HDError as e:
        raise HDError(f"{where}: {e.problem}", e.hint) from None


def build(student: nn.Module, teachers: Mapping[str, nn.Module], dc, *, teacher_dtype: torch.dtype | None = None,
          teacher_pass=None) -> Distiller:
    """The method of a ``[distill]`` section: ``teachers`` maps each name of ``dc.teachers`` to its frozen model;
    ``teacher_dtype``: their precision (``teacher_dtype(dc.teacher_dtype, device)``); ``teacher_pass``: one to
    share (``Distiller``)."""
    targets, mask_teacher = targets_from_config(dc)
    names = dict(zip(labels(list(dc.teachers)), dc.teachers, strict=True))  # label -> the teacher as given
    try:
        return Distiller(student, {lab: teachers[n] for lab, n in names.items()}, targets, mask_teacher=mask_teacher,
                         mask_blocks=tuple(dc.mask_blocks), drop_ratio=dc.drop_ratio, masking=dc.masking, beta=dc.beta,
                         relation_heads=dc.relation_heads, teacher_dtype=teacher_dtype, teacher_drop=dc.teacher_drop,
                         teacher_pass=teacher_pass, reconstruct=reconstruction_of(dc))
    except HDError as e:  # name each teacher as the user gave it, not by its label
        problem = e.problem
        for lab, n in names.items():
            if lab != n:
                problem = problem.replace(f"teacher {lab!r}", f"teacher {n!r}")
        raise HDError(problem, e.hint) from None


def teacher_dtype(name: str, device_type: str) -> torch.dtype:
    """``distill.teacher_dtype`` on a device: ``auto`` is bf16 on CUDA and fp32 on the CPU; fp16 needs CUDA."""
    if name == "auto":
        name = "bf16" if device_type == "cuda" else "fp32"
    if name == "fp16" and device_type != "cuda":
        raise HDError("fp16 teachers need a CUDA GPU", "use --teacher-dtype bf16 or fp32 on the CPU")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
