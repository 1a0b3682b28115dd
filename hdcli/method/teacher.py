"""The teacher side of a step: frozen teachers, each with its own input normalisation, size and dtype, run once
per batch for the keep set and the normalised targets (:class:`TeacherPass` -> :class:`TeacherTargets`).

Teachers are deliberately NOT submodules: :class:`TeacherPass` holds them in a plain dict, so ``parameters()``,
``state_dict()`` (checkpoints), ``load_state_dict`` and DDP see only what trains (and the running statistics of
the targets' normalisers, which are checkpointed). ``.to()/.cuda()`` still move them (``_apply`` is forwarded)
and ``.train()`` leaves them in eval mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hdcli.errors import HDError, did_you_mean
from hdcli.method import masking as masking_lib
from hdcli.method import norms
from hdcli.method.targets import (
    Hidden,
    Pair,
    Target,
    TokenMatch,
    head_mean,
    match_prefix,
    teacher_value,
    wants,
)
from hdcli.models import vit
from hdcli.teachers.registry import STATS

IMAGENET_MEAN, IMAGENET_STD = STATS["imagenet"]  # what the images are normalised with (METHOD.md)


def renorm_affine(mean_in, std_in, mean_t, std_t) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = (x·std_in + mean_in − mean_t)/std_t = x·scale + shift. Returns scale, shift [1, 3, 1, 1]."""
    mean_in, std_in, mean_t, std_t = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                                      for v in (mean_in, std_in, mean_t, std_t))
    return std_in / std_t, (mean_in - mean_t) / std_t


class Teacher(nn.Module):
    """A frozen teacher plus its input adaptor: re-normalisation to its own mean/std (its ``pretrained_cfg``, as
    timm's distillation task lets the teacher own its input normalisation), a resize so that its token grid
    equals the student's (a /14 teacher for a /16 student), and a cast to its parameters' dtype. ``dtype``:
    the teacher's weights are cast to it (its own precision, whatever the student's mixed precision; None: as
    they are)."""

    def __init__(self, model: nn.Module, name: str, grid: tuple[int, int], mean_in=IMAGENET_MEAN,
                 std_in=IMAGENET_STD, dtype: torch.dtype | None = None):
        super().__init__()
        vit.check_vit(model, f"teacher {name!r}")
        model.requires_grad_(False).eval()
        if dtype is not None:
            model.to(dtype)
        self.model = model
        self.name = name
        self.img_size = vit.fit_grid(model, grid)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(cfg.get("std", IMAGENET_STD))
        self.renorm = self.mean != tuple(mean_in) or self.std != tuple(std_in)
        scale, shift = renorm_affine(mean_in, std_in, self.mean, self.std)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def train(self, mode: bool = True):  # a teacher is always in eval mode
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):
        if self.meta:  # an architecture without weights (a run from a target cache): only the adaptor moves
            self.scale, self.shift = fn(self.scale), fn(self.shift)
            return self
        return super()._apply(fn, *args, **kwargs)

    @property
    def meta(self) -> bool:
        """Whether the teacher is an architecture without weights (on the meta device): it cannot run."""
        return next(self.model.parameters()).is_meta

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised for the student -> [B, 3, h, w] in the teacher's normalisation, size, dtype."""
        if self.renorm:
            x = x * self.scale + self.shift
        if tuple(x.shape[-2:]) != self.img_size:
            x = F.interpolate(x, size=self.img_size, mode="bicubic", align_corners=False, antialias=True)
        return x.to(vit.input_dtype(self.model))

    def run(self, images: torch.Tensor, wanted) -> Hidden:
        """The teacher's hidden states ``wanted`` ((at, block) pairs, ``targets.Hidden.run``) on ``images``."""
        return Hidden.run(self.model, *vit.embed(self.model, self.prepare(images)), wanted)


@dataclass
class TeacherTargets:
    """What the teacher pass gives every student: the keep set [B, n] (ascending patch indices) and each loss
    term's target by ``Pair.source`` (target name, teacher block), normalised (feature-like) or per head /
    head-averaged (relations)."""

    keep: torch.Tensor
    values: dict[tuple[str, int | None], torch.Tensor]


class TeacherPass(nn.Module):
    """Runs each teacher once, only as far as its targets need, under ``no_grad``: the keep set, then every target.

    Args:
        teachers: name -> frozen model of a supported family (``hdcli.models.vit``), held outside the module tree.
        targets: the targets (their ``teacher`` names a key of ``teachers``).
        grid: the student's token grid; student_roles: its prefix tokens' roles (``vit.prefix_roles``).
        masking: how the keep set is chosen (``masking.Masking``); mask_teacher: whose hidden states choose it.
        relation_heads: "match" or "mean" (relations averaged over heads).
        input_mean, input_std: the statistics the images are normalised with (ImageNet).
        dtype: the teachers' precision (their weights are cast to it); None keeps them as they are.

    Teachers run under ``torch.no_grad`` (not ``inference_mode``: the keep set and targets enter autograd ops of
    the student that save them for backward, which inference tensors forbid). The mask teacher runs first.
    ``forward`` = :meth:`from_hidden` of :meth:`hidden`: the teachers' forwards, then the keep set and targets
    from their hidden states (several teacher passes over the same teachers share the forwards).
    """

    def __init__(self, teachers: Mapping[str, nn.Module], targets: Sequence[Target], *, grid: tuple[int, int],
                 student_roles: Sequence[str], masking: masking_lib.Masking, mask_teacher: str | None = None,
                 relation_heads: str = "match", input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.targets = tuple(targets)
        self.masking, self.mask_teacher, self.relation_heads = masking, mask_teacher, relation_heads
        self.num_patches = grid[0] * grid[1]
        self.schedule = masking.schedule(self.num_patches)  # static keep counts, outside any compiled graph
        used = {t.teacher for t in self.targets} | ({mask_teacher} if mask_teacher else set())
        for name in sorted(used - set(teachers)):
            raise HDError(f"no teacher named {name!r}", did_you_mean(name, list(teachers)))
        for name in teachers:
            if name not in used:
                raise HDError(f"teacher {name!r} is not used by any target", "drop it or add a target for it")
        self._teachers = {name: Teacher(m, name, grid, input_mean, input_std, dtype) for name, m in teachers.items()}
        self.mask_blocks = masking.teacher_blocks(self.num_patches)  # () when nothing is dropped by the data
        if self.mask_blocks:
            if mask_teacher is None:
                raise HDError(f"{masking.strategy} masking needs a mask teacher",
                              "name the MIM teacher as mask_teacher, or use masking='random' / 'none'")
            mm = self._teachers[mask_teacher].model
            if vit.features_only(mm):
                raise HDError(f"mask teacher {mask_teacher!r} gives features only ({mm.hd_kind}): it has no blocks whose "
                              "tokens could choose the kept ones", "let a ViT teacher choose them (list the MIM teacher "
                              "first, or set mask_teacher), or use masking = 'random' / 'none'")
            vit.check_blocks(mm, masking.blocks, f"mask teacher {mask_teacher!r}", "mask block")
        self.tokens: dict[str, TokenMatch] = {t.name: self._match(t, student_roles) for t in self.targets}
        self.norms = nn.ModuleDict({p.source_key: norms.RunningNorm(t.norm, self.width(t, p.teacher),
                                                                    summary=self.summary_rows(t))
                                    for t in self.targets if t.norm != "layernorm" for p in t.pairs})

    def _match(self, t: Target, student_roles) -> TokenMatch:
        """The prefix tokens ``t`` compares (``match_prefix``); a pooled summary for ``features`` only."""
        tm = self.model(t.teacher)
        match = match_prefix(vit.prefix_roles(tm), student_roles, registers=t.registers,
                             pooled=t.pooled and t.kind == "features")
        if match.pooled and getattr(tm, "global_pool", "") in ("", None):
            raise HDError(f"target {t.name}: the teacher has no class token and no pooling (global_pool='')",
                          "set pooled = false for this target, or load the teacher with its own global_pool")
        if match.pooled and vit.pooled_width(tm) != tm.num_features:
            raise HDError(f"target {t.name}: the teacher's pooled summary has {vit.pooled_width(tm)} channels but its "
                          f"tokens {tm.num_features}", "set pooled = false for this target")
        return match

    def summary_rows(self, t: Target) -> int:
        """Rows at the start of ``t``'s values that are a summary token (the CLS, or a pooled summary): 1 or 0."""
        match = self.tokens[t.name]
        roles = vit.prefix_roles(self.model(t.teacher))
        return int(match.pooled or (bool(match.teacher) and roles[match.teacher[0]] == "cls"))

    def model(self, name: str) -> nn.Module:
        return self._teachers[name].model

    def width(self, t: Target, block: int | None) -> int:
        """Channels of a feature-like target: the final features' (``block`` None) or a block's hidden width."""
        tm = self.model(t.teacher)
        return int(tm.num_features) if block is None else vit.width(tm)

    @property
    def teachers(self) -> dict[str, Teacher]:
        return dict(self._teachers)

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda()/... also move the unregistered teachers
        super()._apply(fn, *args, **kwargs)
        for t in self._teachers.values():
            t._apply(fn)
        return self

    def forward(self, images: torch.Tensor) -> TeacherTargets:
        """images [B, 3, H, W] normalised with the input statistics -> the keep set and every target."""
        return self.from_hidden(self.hidden(images, self.wanted()), images)

    def wanted(self) -> dict[str, list[tuple[str, int | None]]]:
        """teacher name -> the hidden states its targets and the keep set read ((at, block), ``Hidden.run``); a
        teacher that needs none (a mask teacher under random masking with no target of its own) is left out."""
        out = {}
        for name, teacher in self._teachers.items():
            targets = [t for t in self.targets if t.teacher == name]
            wanted = [w for t in targets for w in wants(t, "teacher")]
            wanted += [("enter", b) for b in (self.mask_blocks if name == self.mask_teacher else ())]
            if any(self.tokens[t.name].pooled for t in targets):
                wanted.append(("leave", vit.depth(teacher.model) - 1))
            if wanted:
                out[name] = wanted
        return out

    def hidden(self, images: torch.Tensor, wanted: Mapping[str, Sequence[tuple[str, int | None]]]) -> dict[str, Hidden]:
        """Each teacher of ``wanted`` run once (under ``no_grad``, the mask teacher first) as far as it says."""
        with torch.no_grad():
            return {name: self._teachers[name].run(images, wanted[name])
                    for name in sorted(wanted, key=lambda n: n != self.mask_teacher)}

    def from_hidden(self, runs: Mapping[str, Hidden], images: torch.Tensor, normalise: bool = True) -> TeacherTargets:
        """The keep set and every target from the teachers' hidden states ``runs`` (:meth:`hidden`, holding at
        least what :meth:`wanted` asks); ``normalise=False``: feature targets as the teacher gives them (what a
        target cache stores; :meth:`normalise` finishes them)."""
        with torch.no_grad():
            keep = self._keep(runs, images)
            values = {src: self._shape(t, teacher_value(t, runs[t.teacher], p, keep, self.tokens[t.name]))
                      for src, (t, p) in self.sources().items()}
        targets = TeacherTargets(keep=keep, values=values)
        return self.normalise(targets) if normalise else targets

    def sources(self) -> dict[tuple[str, int | None], tuple[Target, Pair]]:
        """Each value the teacher side gives (``Pair.source``) with a target and loss term it serves (a ladder's
        terms share one)."""
        return {p.source: (t, p) for t in self.targets for p in t.pairs}

    def normalise(self, targets: TeacherTargets) -> TeacherTargets:
        """Feature targets as the loss compares them (``t.norm``: LayerNorm per token, or running statistics
        updated in training mode); relations as they are."""
        with torch.no_grad():
            values = {src: v if not t.feature_like else
                      norms.layernorm(v) if t.norm == "layernorm" else self.norms[p.source_key](v)
                      for src, (t, p) in self.sources().items() for v in (targets.values[src],)}
        return TeacherTargets(keep=targets.keep, values=values)

    def _keep(self, runs: dict[str, Hidden], images: torch.Tensor) -> torch.Tensor:
        """The keep set [B, n_keep]: from the mask teacher's patch tokens entering its mask blocks, or drawn."""
        hiddens = []
        if self.mask_blocks:
            run = runs[self.mask_teacher]
            p = vit.num_prefix(run.model)
            hiddens = [run.entering[i][:, p:] for i in self.mask_blocks]  # [B, N, D] patch tokens per mask block
        return masking_lib.keep_set(self.masking, hiddens, batch=images.shape[0], n=self.num_patches,
                                    device=images.device, schedule=self.schedule)

    def _shape(self, t: Target, v: torch.Tensor) -> torch.Tensor:
        """Relations per head or averaged over heads (``relation_heads``); feature targets as they are."""
        if not t.feature_like and self.relation_heads == "mean":
            return head_mean(v)
        return v

    def renormalised(self) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
        """name -> (mean, std) of each teacher that expects other input statistics than the images have."""
        return {name: (t.mean, t.std) for name, t in self._teachers.items() if t.renorm}
