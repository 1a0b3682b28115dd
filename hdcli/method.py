"""Hybrid Distill as a PyTorch module: teachers, targets, student pass, losses (METHOD.md is the contract).

    from hdcli.method import HybridDistill
    hd = HybridDistill(student, mim_teacher, feat_teacher)       # the paper's default
    out = hd(images)             # images: float [B,3,H,W], ImageNet-normalised
    out.loss.backward()          # gradients reach hd.student and hd.heads only

``Distiller`` is the general form: any teachers, a list of ``Target(teacher, kind, blocks, weight)``
and a masking strategy; every single-teacher baseline and ablation of the paper is a configuration
of it (docs/method.md lists them).

Teachers are deliberately NOT submodules: they live in a plain dict, so ``parameters()``,
``state_dict()`` (checkpoints), ``load_state_dict`` and DDP see exactly the student and the heads.
``.to()/.cuda()/.half()`` still move them (``_apply`` is forwarded), ``.train()`` leaves them in eval
mode, and ``method.teachers`` gives them to an engine that wants to prepare them itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hdcli import masking as masking_lib
from hdcli.errors import HDError, did_you_mean
from hdcli.models import vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

KINDS = ("features", "relations", "block", "msa")
RELATION_HEADS = ("match", "mean")


@dataclass(frozen=True)
class Target:
    """One distillation target: what to take from which teacher, where, and with what weight.

    kind: ``features`` (final features after the final norm; ``blocks`` must be empty),
    ``relations`` (q·kᵀ entering each block of ``blocks``), ``block`` (hidden state leaving each
    block), ``msa`` (attention branch output of each block). ``student_blocks`` are the matching
    student blocks (default: the same indices). Losses over several blocks are averaged, then
    multiplied by ``weight``. ``name`` defaults to ``"<teacher>/<kind>"`` (the key in ``out.parts``).
    """

    teacher: str
    kind: str
    blocks: tuple[int, ...] = ()
    weight: float = 1.0
    student_blocks: tuple[int, ...] | None = None
    name: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if self.student_blocks is not None:
            object.__setattr__(self, "student_blocks", tuple(int(b) for b in self.student_blocks))
        if self.name is None:
            object.__setattr__(self, "name", f"{self.teacher}/{self.kind}")

    @property
    def feature_like(self) -> bool:
        """Features, block and msa targets go into ``loss_feat`` through a linear head; relations do not."""
        return self.kind != "relations"

    @property
    def s_blocks(self) -> tuple[int, ...]:
        return self.blocks if self.student_blocks is None else self.student_blocks


@dataclass
class DistillOutput:
    """loss = loss_feat + loss_rel (both already weighted); keep [B, n] kept patch indices (ascending,
    0-based, CLS excluded); parts: unweighted loss of each target by name."""

    loss: torch.Tensor
    loss_feat: torch.Tensor
    loss_rel: torch.Tensor
    keep: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


# a pytree node, so that DDP (find_unused_parameters / static_graph) and torch.compile see its tensors
try:
    from torch.utils._pytree import register_dataclass as _register_dataclass
except ImportError:  # older torch
    from torch.export import register_dataclass as _register_dataclass
_register_dataclass(DistillOutput)


# ---------------------------------------------------------------- losses (pure functions, METHOD.md "Loss")

def smooth_l1(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """SmoothL1 with ``beta``, mean over all elements, computed in fp32 whatever the autocast dtype."""
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta)


def normalize_target(f: torch.Tensor) -> torch.Tensor:
    """Per-token LayerNorm without affine parameters (eps 1e-6) of a feature-like target. [.., D] -> [.., D] fp32."""
    return F.layer_norm(f.float(), f.shape[-1:], eps=1e-6)


def head_mean(r: torch.Tensor) -> torch.Tensor:
    """``relation_heads="mean"``: average relations over heads. [B, H, T, T] -> [B, 1, T, T]."""
    return r.mean(dim=1, keepdim=True)


def renorm_affine(mean_in, std_in, mean_t, std_t) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = (x·std_in + mean_in − mean_t)/std_t = x·scale + shift. Returns scale, shift [1, 3, 1, 1]."""
    mean_in, std_in, mean_t, std_t = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                                      for v in (mean_in, std_in, mean_t, std_t))
    return std_in / std_t, (mean_in - mean_t) / std_t


def default_blocks(depth: int) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """The paper's blocks for a depth-L MIM teacher: relations at paper layers L-2, L-1 (blocks L-3, L-2)
    and masking at paper layers [0, L/3, 2L/3] (blocks 0, L/3, 2L/3). Depth 12 -> ((9, 10), (0, 4, 8))."""
    return (depth - 3, depth - 2), (0, depth // 3, 2 * depth // 3)


# ---------------------------------------------------------------- teachers

class _Teacher(nn.Module):
    """A frozen timm ViT plus its input adaptor: re-normalisation to its own mean/std and a resize so
    that its token grid equals the student's. Held outside the Distiller's module tree."""

    def __init__(self, model: nn.Module, name: str, grid: tuple[int, int], mean_in, std_in):
        super().__init__()
        vit.check_vit(model, f"teacher {name!r}")
        model.requires_grad_(False).eval()
        self.model = model
        self.name = name
        self.img_size = vit.fit_grid(model, grid)  # input size giving the student's grid (/14 vs /16)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean_t, std_t = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        self.renorm = tuple(mean_t) != tuple(mean_in) or tuple(std_t) != tuple(std_in)
        scale, shift = renorm_affine(mean_in, std_in, mean_t, std_t)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def train(self, mode: bool = True):  # a teacher is always in eval mode
        return super().train(False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] ImageNet-normalised -> [B, 3, h, w] in the teacher's normalisation, size and dtype."""
        if self.renorm:
            x = x * self.scale + self.shift
        if tuple(x.shape[-2:]) != self.img_size:
            x = F.interpolate(x, size=self.img_size, mode="bicubic", align_corners=False, antialias=True)
        return x.to(self.model.patch_embed.proj.weight.dtype)


# ---------------------------------------------------------------- the module

class Distiller(nn.Module):
    """Distil ``student`` from frozen ``teachers`` on a list of ``targets`` (METHOD.md).

    Args:
        student: a timm ViT (one CLS token), randomly initialised; trained.
        teachers: name -> timm ViT; frozen here (requires_grad False, eval) and kept out of the module
            tree (see the module docstring): not in ``parameters()``/``state_dict()``, ignored by DDP.
        targets: what to distil (``Target``); each feature-like target gets a linear head
            (student width -> target width, with bias) in ``heads``.
        mask_teacher: the teacher whose hidden states choose the kept tokens (``progressive``/``direct``);
            None allows only ``random`` and ``none`` (or a drop ratio of 0).
        mask_blocks: mask teacher blocks, entering which a masking step runs (default 0, 4, 8).
        drop_ratio: fraction dropped per step, n' = floor(n·(1−r)+0.5) (0.3: 196 -> 137 -> 96 -> 67).
        masking: progressive | direct | random | none (paper Tab. 8).
        beta: SmoothL1 beta (2.0, as in FD and dBOT).
        relation_heads: "match" (head counts must agree) or "mean" (average R over heads on both sides).
        input_mean, input_std: the statistics the input images are normalised with (ImageNet).

    ``forward(images)`` returns a ``DistillOutput``. Teachers run under ``torch.no_grad`` (not
    ``inference_mode``: their outputs — keep indices, targets — are used by autograd ops of the student
    that save them for backward, which inference tensors forbid, and ``no_grad`` traces in
    ``torch.compile`` without graph breaks). The module never changes dtype or enters autocast itself;
    teacher inputs are cast to the teacher's parameter dtype, losses are computed in fp32.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: Mapping[str, nn.Module],
        targets: Sequence[Target],
        mask_teacher: str | None = None,
        mask_blocks: Sequence[int] = (0, 4, 8),
        drop_ratio: float = 0.3,
        masking: str = "progressive",
        beta: float = 2.0,
        relation_heads: str = "match",
        input_mean: Sequence[float] = IMAGENET_MEAN,
        input_std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        vit.check_vit(student, "the student")
        self.masking = masking_lib.check_strategy(masking)
        self.drop_ratio = masking_lib.check_drop_ratio(drop_ratio)
        if relation_heads not in RELATION_HEADS:
            raise HDError(f"unknown relation_heads {relation_heads!r}", did_you_mean(relation_heads, RELATION_HEADS))
        if not targets:
            raise HDError("no distillation targets", "give at least one Target(teacher, kind, blocks, weight)")
        self.relation_heads = relation_heads
        self.beta = float(beta)
        self.student = student
        self.grid = tuple(int(g) for g in student.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.img_size = tuple(g * p for g, p in zip(self.grid, vit.patch_size(student), strict=True))

        # teachers: validated, frozen, adapted to the student's grid; kept in a plain dict (not registered)
        used = {t.teacher for t in targets} | ({mask_teacher} if mask_teacher else set())
        for name in used:
            if name not in teachers:
                raise HDError(f"no teacher named {name!r}", did_you_mean(name, list(teachers)))
        for name in teachers:
            if name not in used:
                raise HDError(f"teacher {name!r} is not used by any target", "drop it or add a target for it")
            if "." in name or not name:
                raise HDError(f"teacher name {name!r} must be non-empty and contain no '.'")
        self._teachers: dict[str, _Teacher] = {
            name: _Teacher(m, name, self.grid, input_mean, input_std) for name, m in teachers.items()
        }

        # targets: kinds, blocks (in range for both models), widths and head counts
        self.targets: tuple[Target, ...] = tuple(targets)
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise HDError(f"duplicate target names {names}", "give repeated teacher/kind pairs a distinct name=")
        heads = {}
        for t in self.targets:
            if t.kind not in KINDS:
                raise HDError(f"unknown target kind {t.kind!r}", did_you_mean(t.kind, KINDS))
            tm = self._teachers[t.teacher].model
            if t.kind == "features":
                if t.blocks or t.student_blocks:
                    raise HDError(f"target {t.name}: features are taken after the final norm, not at blocks",
                                  "use kind='block' for the output of an intermediate block")
                heads[_head_key(t)] = _linear(vit.width(student), tm.num_features)
                continue
            if not t.blocks:
                raise HDError(f"target {t.name} needs at least one block")
            vit.check_blocks(tm, t.blocks, f"teacher {t.teacher!r}", f"{t.kind} block")
            vit.check_blocks(student, t.s_blocks, "the student", f"{t.kind} block")
            if len(t.s_blocks) != len(t.blocks):
                raise HDError(f"target {t.name}: {len(t.blocks)} teacher blocks but {len(t.s_blocks)} student blocks",
                              "give one student block per teacher block")
            if t.kind == "relations":
                for bt, bs in zip(t.blocks, t.s_blocks, strict=True):
                    ht, hs = vit.num_heads(tm, bt), vit.num_heads(student, bs)
                    if ht != hs and relation_heads != "mean":
                        raise HDError(f"teacher {t.teacher!r} has {ht} heads at block {bt}, the student {hs} at block {bs}",
                                      "relations need equal head counts; pass relation_heads='mean' to average over heads")
            else:
                for b in t.blocks:
                    heads[_head_key(t, b)] = _linear(vit.width(student), vit.width(tm))
        self.heads = nn.ModuleDict(heads)

        # masking: which teacher, which blocks, and the static keep count
        self.mask_teacher = mask_teacher
        self.mask_blocks = tuple(sorted(set(int(b) for b in mask_blocks)))
        self.n_keep = masking_lib.keep_count(self.num_patches, self.drop_ratio, len(self.mask_blocks))
        self._needs_mask_hiddens = self.masking in ("progressive", "direct") and self.n_keep < self.num_patches
        if self._needs_mask_hiddens:
            if mask_teacher is None:
                raise HDError(f"{self.masking} masking needs a mask teacher",
                              "name the MIM teacher as mask_teacher, or use masking='random' / 'none'")
            vit.check_blocks(self._teachers[mask_teacher].model, self.mask_blocks,
                             f"mask teacher {mask_teacher!r}", "mask block")
        if self.masking == "none":
            self.n_keep = self.num_patches

    # ---------------------------------------------------------------- module plumbing

    @property
    def teachers(self) -> dict[str, nn.Module]:
        """name -> frozen timm ViT (not submodules: see the module docstring)."""
        return {name: t.model for name, t in self._teachers.items()}

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.half()/... also move the unregistered teachers (and their renorm constants)
        super()._apply(fn, *args, **kwargs)
        for t in self._teachers.values():
            t._apply(fn)
        return self

    def head(self, target: str, block: int | None = None) -> nn.Linear:
        """The linear head of a feature-like target by name (and block for block/msa targets)."""
        t = next((t for t in self.targets if t.name == target), None)
        if t is None:
            raise HDError(f"no target named {target!r}", did_you_mean(target, [t.name for t in self.targets]))
        return self.heads[_head_key(t, block)]

    # ---------------------------------------------------------------- forward

    def forward(self, images: torch.Tensor) -> DistillOutput:
        """images: float [B, 3, H, W], normalised with ``input_mean/input_std`` -> DistillOutput."""
        if tuple(images.shape[-2:]) != self.img_size:
            raise HDError(f"images are {tuple(images.shape[-2:])} px but the student expects {self.img_size}",
                          "resize the data to the student's img_size (the keep sets and teachers are set up for it)")
        with torch.no_grad():
            keep, wanted = self._teacher_pass(images)  # keep [B, n_keep]; wanted[(name, block)] targets
        s_targets = self._student_pass(images, keep)
        loss_feat = images.new_zeros((), dtype=torch.float32)
        loss_rel = images.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for t in self.targets:
            if t.kind == "features":
                part = smooth_l1(self.heads[_head_key(t)](s_targets[(t.name, None)]), wanted[(t.name, None)], self.beta)
            elif t.kind == "relations":
                part = sum(smooth_l1(s_targets[(t.name, bs)], wanted[(t.name, bt)], self.beta)
                           for bt, bs in zip(t.blocks, t.s_blocks, strict=True)) / len(t.blocks)
            else:
                part = sum(smooth_l1(self.heads[_head_key(t, bt)](s_targets[(t.name, bs)]), wanted[(t.name, bt)], self.beta)
                           for bt, bs in zip(t.blocks, t.s_blocks, strict=True)) / len(t.blocks)
            parts[t.name] = part
            if t.feature_like:
                loss_feat = loss_feat + t.weight * part
            else:
                loss_rel = loss_rel + t.weight * part
        return DistillOutput(loss=loss_feat + loss_rel, loss_feat=loss_feat, loss_rel=loss_rel, keep=keep, parts=parts)

    def _teacher_pass(self, images: torch.Tensor):
        """Run each teacher as far as its targets need; return the keep set and the normalised targets.

        The mask teacher runs first on the full sequence (the mask is bookkeeping only); its hidden
        states at the mask blocks give the keep set, then every tap is restricted to CLS + kept.
        """
        b = images.shape[0]
        order = sorted(self._teachers, key=lambda n: n != self.mask_teacher)  # mask teacher first
        runs = {}
        for name in order:
            t = self._teachers[name]
            tg = [x for x in self.targets if x.teacher == name]
            enter = {bk for x in tg if x.kind in ("relations", "msa") for bk in x.blocks}
            leave = {bk for x in tg if x.kind == "block" for bk in x.blocks}
            final = any(x.kind == "features" for x in tg)
            if name == self.mask_teacher and self._needs_mask_hiddens:
                mblocks = self.mask_blocks if self.masking == "progressive" else self.mask_blocks[-1:]
                enter |= set(mblocks)
            if not (enter or leave or final):
                continue  # e.g. a mask teacher under random/none masking: nothing to compute
            h = vit.embed(t.model, t.prepare(images))  # [B, 1+N, D]
            runs[name] = (tg, *vit.run_blocks(t.model, h, enter=enter, leave=leave, final=final))

        if self._needs_mask_hiddens:
            entering = runs[self.mask_teacher][1]
            mblocks = self.mask_blocks if self.masking == "progressive" else self.mask_blocks[-1:]
            hiddens = [entering[i][:, 1:] for i in mblocks]  # [B, N, D] patch tokens entering each mask block
            keep = masking_lib.keep_set(self.masking, hiddens, self.drop_ratio, steps=len(self.mask_blocks))
        else:
            keep = masking_lib.keep_set(self.masking, [], self.drop_ratio, batch=b, n=self.num_patches,
                                        steps=len(self.mask_blocks), device=images.device)

        wanted: dict[tuple[str, int | None], torch.Tensor] = {}
        for name, (tg, entering, leaving, feats) in runs.items():
            blocks = self._teachers[name].model.blocks
            for x in tg:
                if x.kind == "features":
                    wanted[(x.name, None)] = normalize_target(vit.gather_tokens(feats, keep))
                for bk in x.blocks:
                    if x.kind == "relations":
                        r = vit.relations(blocks[bk], vit.gather_tokens(entering[bk], keep))  # [B, H, 1+n, 1+n]
                        wanted[(x.name, bk)] = head_mean(r) if self.relation_heads == "mean" else r
                    elif x.kind == "msa":
                        wanted[(x.name, bk)] = normalize_target(vit.gather_tokens(vit.msa(blocks[bk], entering[bk]), keep))
                    elif x.kind == "block":
                        wanted[(x.name, bk)] = normalize_target(vit.gather_tokens(leaving[bk], keep))
        return keep, wanted

    def _student_pass(self, images: torch.Tensor, keep: torch.Tensor) -> dict[tuple[str, int | None], torch.Tensor]:
        """Student on CLS + kept tokens only (gathered before block 0); returns its taps per target."""
        s = self.student
        enter = {bk for t in self.targets if t.kind in ("relations", "msa") for bk in t.s_blocks}
        leave = {bk for t in self.targets if t.kind == "block" for bk in t.s_blocks}
        final = any(t.kind == "features" for t in self.targets)
        x = vit.embed_kept(s, images, None if keep.shape[1] == self.num_patches else keep)  # [B, 1+n, D]
        ckpt = bool(getattr(s, "grad_checkpointing", False)) and self.training
        entering, leaving, feats = vit.run_blocks(s, x, enter=enter, leave=leave, final=final, checkpoint=ckpt)
        out: dict[tuple[str, int | None], torch.Tensor] = {}
        for t in self.targets:
            if t.kind == "features":
                out[(t.name, None)] = feats
            for bk in t.s_blocks:  # empty for features
                if t.kind == "relations":
                    r = vit.relations(s.blocks[bk], entering[bk])  # [B, H, 1+n, 1+n]
                    out[(t.name, bk)] = head_mean(r) if self.relation_heads == "mean" else r
                elif t.kind == "msa":
                    out[(t.name, bk)] = vit.msa(s.blocks[bk], entering[bk])
                else:
                    out[(t.name, bk)] = leaving[bk]
        return out


def _head_key(t: Target, block: int | None = None) -> str:
    key = t.name.replace("/", "_").replace(".", "_")
    return key if block is None else f"{key}_{block}"


def _linear(d_in: int, d_out: int) -> nn.Linear:
    head = nn.Linear(d_in, d_out)
    nn.init.trunc_normal_(head.weight, std=0.02)  # timm's init for linear layers
    nn.init.zeros_(head.bias)
    return head


class HybridDistill(Distiller):
    """The paper's Hybrid Distill (Sec. 3): features of ``feat_teacher`` (CLIP or DeiT) after its final
    norm, plus ``alpha`` × relations q·kᵀ of ``mim_teacher`` (MAE) entering ``relation_blocks``, with the
    student seeing CLS + the tokens kept by progressive redundant-token masking from the MIM teacher.

    Teachers are named ``"feature"`` and ``"mim"``; targets ``"feature/features"`` and ``"mim/relations"``.
    ``student_relation_blocks`` (default: ``relation_blocks``) are the student's blocks for the relations.
    """

    def __init__(
        self,
        student: nn.Module,
        mim_teacher: nn.Module,
        feat_teacher: nn.Module,
        relation_blocks: Sequence[int] = (9, 10),
        mask_blocks: Sequence[int] = (0, 4, 8),
        drop_ratio: float = 0.3,
        alpha: float = 1.0,
        beta: float = 2.0,
        masking: str = "progressive",
        relation_heads: str = "match",
        student_relation_blocks: Sequence[int] | None = None,
    ):
        targets = [
            Target("feature", "features"),
            Target("mim", "relations", tuple(relation_blocks), alpha,
                   None if student_relation_blocks is None else tuple(student_relation_blocks)),
        ]
        super().__init__(student, {"mim": mim_teacher, "feature": feat_teacher}, targets, mask_teacher="mim",
                         mask_blocks=mask_blocks, drop_ratio=drop_ratio, masking=masking, beta=beta,
                         relation_heads=relation_heads)

    @property
    def feature_head(self) -> nn.Linear:
        """nn.Linear(student width -> feature-teacher width) applied to the student's final features."""
        return self.heads["feature_features"]
