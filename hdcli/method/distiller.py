"""Distil a student from frozen teachers on a list of targets: teacher pass -> student pass -> loss (METHOD.md).

    from hdcli.method import Distiller, Target
    method = Distiller(student, {"mae": mae, "clip": clip},
                       [Target("clip", "features"), Target("mae", "relations", (9, 10))], mask_teacher="mae")
    out = method(images)         # images: float [B, 3, H, W], ImageNet-normalised
    out.loss.backward()          # gradients reach method.student and method.heads only

Every single-teacher baseline and ablation of the paper is a configuration of it (docs/method.md lists them);
:class:`~hdcli.method.hybrid.HybridDistill` is the paper's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hdcli.errors import HDError, did_you_mean
from hdcli.method import heads as heads_lib
from hdcli.method import signals
from hdcli.method.losses import BETA
from hdcli.method.masking import Masking, Reconstruction, block_mask
from hdcli.method.names import RELATION_HEADS, paper_blocks
from hdcli.method.targets import KINDS, Hidden, Pair, Target, at, head_mean, student_value, wants
from hdcli.method.teacher import IMAGENET_MEAN, IMAGENET_STD, TeacherPass, TeacherTargets
from hdcli.models import vit


@dataclass
class DistillOutput:
    """loss = loss_feat + loss_rel (both weighted); keep [B, n] the kept patch indices (ascending, 0-based, prefix
    tokens excluded); parts: each target's unweighted loss by name (before any teacher dropping); signals
    (``detail``): ``cos/<target>`` and ``attn/<target>/<student block>`` (:mod:`hdcli.method.signals`); dropped:
    with teacher dropping, the fraction of this batch's images whose loss of each feature target was dropped."""

    loss: torch.Tensor
    loss_feat: torch.Tensor
    loss_rel: torch.Tensor
    keep: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: dict[str, torch.Tensor] = field(default_factory=dict)


# a pytree node, so that DDP (find_unused_parameters / static_graph) and torch.compile see its tensors
try:
    from torch.utils._pytree import register_dataclass as _register_dataclass
except ImportError:  # older torch
    from torch.export import register_dataclass as _register_dataclass
_register_dataclass(DistillOutput)


class Distiller(nn.Module):
    """Distil ``student`` from frozen ``teachers`` on ``targets`` (METHOD.md).

    Args:
        student: a timm ViT of a supported family (``hdcli.models.vit``), trained.
        teachers: name -> frozen model; held by :attr:`teacher_pass` outside the module tree (not in
            ``parameters()``/``state_dict()``, ignored by DDP).
        targets: what to distil (:class:`~hdcli.method.targets.Target`); each feature-like target gets a head
            (student width -> target width) per block in :attr:`heads`.
        mask_teacher: the teacher whose hidden states choose the kept tokens (``progressive``/``direct``).
        mask_blocks, drop_ratio, masking: the keep set (:class:`~hdcli.method.masking.Masking`; the paper's 0, 4,
            8, 0.3, progressive: 196 -> 137 -> 96 -> 67 tokens).
        beta: SmoothL1 beta (2.0, as FD and dBOT).
        relation_heads: "match" (head counts must agree) or "mean" (relations averaged over heads).
        input_mean, input_std: the statistics the input images are normalised with (ImageNet).
        teacher_dtype: the teachers' precision (their weights are cast to it); None keeps them as they are.
        teacher_drop: UNIC's teacher dropping (``drop_teachers``): in training, per image, each feature target's loss
            is dropped with this probability, never the one with the highest loss; 0 (the paper): off.
        teacher_pass: an existing :class:`~hdcli.method.teacher.TeacherPass` over the same teachers and targets
            to use instead of building one (several students sharing one: it is then held, not registered, so
            its owner, e.g. :class:`~hdcli.method.students.Students`, keeps its statistics in ``state_dict``).
        reconstruct: mask feature reconstruction (paper Sec. 2.4; :class:`~hdcli.method.masking.Reconstruction`):
            the student sees every patch position, SimMIM-masked ones replaced by :attr:`mask_token` (a parameter of
            the method, not of the student), and the loss counts the masked positions only. Final-feature targets
            and no keep set only.

    ``forward(images, detail=False)`` returns a :class:`DistillOutput`; with ``detail`` it also holds the per-target
    signals, computed under ``no_grad`` from the step's own tensors. The module never changes dtype or enters
    autocast itself; teacher inputs are cast to each teacher's dtype; losses are computed in fp32.
    """

    def __init__(self, student: nn.Module, teachers: Mapping[str, nn.Module], targets: Sequence[Target],
                 mask_teacher: str | None = None, mask_blocks: Sequence[int] = paper_blocks().mask,
                 drop_ratio: float = 0.3, masking: str = "progressive", beta: float = BETA,
                 relation_heads: str = "match", input_mean: Sequence[float] = IMAGENET_MEAN,
                 input_std: Sequence[float] = IMAGENET_STD, teacher_dtype: torch.dtype | None = None,
                 teacher_drop: float = 0.0, teacher_pass: TeacherPass | None = None,
                 reconstruct: Reconstruction | None = None):
        super().__init__()
        vit.check_vit(student, "the student")
        if not targets:
            raise HDError("no distillation targets", "give at least one Target(teacher, kind, blocks, weight)")
        if relation_heads not in RELATION_HEADS:
            raise HDError(f"unknown relation_heads {relation_heads!r}", did_you_mean(relation_heads, RELATION_HEADS))
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise HDError(f"duplicate target names {names}", "give repeated teacher/kind pairs a distinct name")
        self.student = student
        self.targets: tuple[Target, ...] = tuple(targets)
        self.beta, self.relation_heads = float(beta), relation_heads
        if not 0 <= teacher_drop < 1:
            raise HDError(f"teacher_drop is a probability in [0, 1), got {teacher_drop}", "0 turns it off (the paper)")
        self.teacher_drop = float(teacher_drop)
        self.grid = tuple(int(g) for g in student.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.img_size = tuple(g * p for g, p in zip(self.grid, vit.patch_size(student), strict=True))
        if teacher_pass is None:
            self.teacher_pass = TeacherPass(teachers, self.targets, grid=self.grid,
                                            student_roles=vit.prefix_roles(student),
                                            masking=Masking(masking, drop_ratio, tuple(mask_blocks)),
                                            mask_teacher=mask_teacher, relation_heads=relation_heads,
                                            input_mean=input_mean, input_std=input_std, dtype=teacher_dtype)
        else:  # held, not registered: its owner keeps it in the module tree
            object.__setattr__(self, "teacher_pass", teacher_pass)
        if self.masking.drops(self.num_patches):
            vit.check_gathers_tokens(student, "the student")
        self.heads = nn.ModuleDict({p.key: head for t in self.targets for p, head in self._check(t).items()})
        self.reconstruct = reconstruct
        if reconstruct is not None:
            self._check_reconstruct(reconstruct)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.width(student)))
            nn.init.trunc_normal_(self.mask_token, std=0.02)  # SimMIM's init
        self._summary = {t.name: self.teacher_pass.summary_rows(t) for t in self.targets}  # the CLS/summary row

    def _check(self, t: Target) -> dict[Pair, nn.Module]:
        """Blocks in range for both models, attention that exposes q·kᵀ, head counts; the heads of ``t``."""
        s, tm = self.student, self.teacher_pass.model(t.teacher)
        if vit.features_only(tm) and t.kind != "features":
            raise HDError(f"teacher {t.teacher!r} gives features only ({tm.hd_kind}): it has no blocks for a {t.kind} "
                          f"target", "take its final features (kind = \"features\") and relations from a ViT teacher")
        if KINDS[t.kind].at == "final":
            if t.blocks:
                raise HDError(f"target {t.name}: features are taken after the teacher's final norm, not at blocks",
                              "use kind='block' for the output of an intermediate block")
            vit.check_blocks(s, t.student_blocks or (), "the student", "ladder block")
        else:
            if not t.blocks:
                raise HDError(f"target {t.name} needs at least one block")
            if len(t.s_blocks) != len(t.blocks):
                raise HDError(f"target {t.name}: {len(t.blocks)} teacher blocks but {len(t.s_blocks)} student blocks",
                              "give one student block per teacher block")
            vit.check_blocks(tm, t.blocks, f"teacher {t.teacher!r}", f"{t.kind} block")
            vit.check_blocks(s, t.s_blocks, "the student", f"{t.kind} block")
        if t.kind in ("relations", "msa"):
            vit.check_attention(tm, t.blocks, f"teacher {t.teacher!r}", f"target {t.name}")
            vit.check_attention(s, t.s_blocks, "the student", f"target {t.name}")
        if t.feature_like:
            return {p: heads_lib.build(t.head, vit.width(s), self.teacher_pass.width(t, p.teacher)) for p in t.pairs}
        for p in t.pairs:  # relations: R is [B, H, T, T] on both sides
            ht, hs = vit.num_heads(tm, p.teacher), vit.num_heads(s, p.student)
            if ht != hs and self.relation_heads != "mean":
                raise HDError(f"teacher {t.teacher!r} has {ht} heads at block {p.teacher}, the student {hs} at block "
                              f"{p.student}", "relations need equal head counts; pass relation_heads='mean' to "
                              "average over heads")
        return {}

    def _check_reconstruct(self, r: Reconstruction) -> None:
        check_reconstruction(self.targets, self.masking.drops(self.num_patches))
        r.block_for(self.grid)

    # ---------------------------------------------------------------- forward = teacher pass + student pass

    def forward(self, images: torch.Tensor, detail: bool = False, cached: TeacherTargets | None = None) -> DistillOutput:
        """images: float [B, 3, H, W] normalised with the input statistics -> DistillOutput. ``cached``: the teacher
        pass's keep set and targets for these images read from a target cache (not normalised): the teachers
        do not run."""
        if tuple(images.shape[-2:]) != self.img_size:
            raise HDError(f"images are {tuple(images.shape[-2:])} px but the student expects {self.img_size}",
                          "resize the data to the student's img_size (the keep sets and teachers are set up for it)")
        targets = self.teacher_pass(images) if cached is None else self.teacher_pass.normalise(cached)
        return self.student_pass(images, targets, detail=detail)

    def student_pass(self, images: torch.Tensor, targets: TeacherTargets, detail: bool = False) -> DistillOutput:
        """The student on its prefix tokens + the kept patches only (gathered before block 0), its values for each
        loss term, and the loss against ``targets`` (the teacher pass of the same images)."""
        keep, s = targets.keep, self.student
        mask = self.reconstruction_mask(images.shape[0], images.device) if self.reconstruct is not None else None
        x, rope = vit.embed_kept(s, images, None if keep.shape[1] == self.num_patches else keep,
                                 None if mask is None else (mask, self.mask_token))  # [B, P+n, D]
        ckpt = bool(getattr(s, "grad_checkpointing", False)) and self.training
        run = Hidden.run(s, x, rope, [w for t in self.targets for w in wants(t, "student")], checkpoint=ckpt)
        tokens = self.teacher_pass.tokens
        mine = {p: self._predict(t, p, student_value(t, run, p, tokens[t.name])) for t in self.targets for p in t.pairs}
        if mask is not None:  # the loss counts the masked positions only
            mine, targets = masked_rows(mine, targets, mask, {t.name: len(tokens[t.name].student) for t in self.targets})
        return self.loss(mine, targets, detail=detail)

    def reconstruction_mask(self, batch: int, device) -> torch.Tensor:
        """SimMIM's random block mask for a batch (:func:`~hdcli.method.masking.block_mask`): bool [B, N]."""
        r = self.reconstruct
        b = r.block_for(self.grid)
        noise = torch.rand(batch, (self.grid[0] // b) * (self.grid[1] // b), device=device)
        return block_mask(noise, self.grid, r.ratio, b)

    def _predict(self, t: Target, pair: Pair, v: torch.Tensor) -> torch.Tensor:
        """The student's value as the loss compares it: through its head (feature-like), or its relations."""
        if t.feature_like:
            return self.heads[pair.key](v)
        return head_mean(v) if self.relation_heads == "mean" else v

    def loss(self, predictions: dict[Pair, torch.Tensor], targets: TeacherTargets, detail: bool = False) -> DistillOutput:
        """L = L_feat + L_rel (METHOD.md "Loss"): each target's loss averaged over its block pairs, weighted, and
        summed by kind (feature-like targets into ``loss_feat``, relations into ``loss_rel``). With teacher
        dropping, ``loss_feat`` weighs each image's feature losses by what :func:`drop_teachers` keeps."""
        loss_rel = targets.keep.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        feat = [t for t in self.targets if t.feature_like]
        dropping = self.training and self.teacher_drop > 0 and len(feat) > 1
        per_image: dict[str, torch.Tensor] = {}
        for t in self.targets:
            one = dropping and t.feature_like  # per image: [B]
            part = sum(self._term(t, predictions[p], targets.values[p.source], one) for p in t.pairs) / len(t.pairs)
            if one:
                per_image[t.name], part = part, part.mean()
            parts[t.name] = part
            if not t.feature_like:
                loss_rel = loss_rel + t.weight * part
        dropped = {}
        if dropping:
            losses = torch.stack([per_image[t.name] for t in feat])  # [T, B]
            weights = torch.tensor([t.weight for t in feat], device=losses.device)[:, None]
            keep = drop_teachers(losses.detach(), self.teacher_drop)
            loss_feat = len(feat) * (keep * weights * losses).sum() / keep.sum()
            dropped = {t.name: 1.0 - keep[i].mean() for i, t in enumerate(feat)}
        else:
            loss_feat = targets.keep.new_zeros((), dtype=torch.float32)
            for t in feat:
                loss_feat = loss_feat + t.weight * parts[t.name]
        return DistillOutput(loss=loss_feat + loss_rel, loss_feat=loss_feat, loss_rel=loss_rel, keep=targets.keep,
                             parts=parts, signals=self._signals(predictions, targets) if detail else {},
                             dropped=dropped)

    def _term(self, t: Target, pred: torch.Tensor, target: torch.Tensor, per_sample: bool) -> torch.Tensor:
        """One loss term of ``t``: its loss over every row, or (``t.split``) ``summary_weight`` × the summary row's
        loss + (1 − ``summary_weight``) × the other rows' (the patch loss alone when no summary row is compared)."""
        if not t.split:
            return t.loss(pred, target, self.beta, per_sample)
        n = self._summary[t.name]
        patch = (t.patch_loss or t.loss)(pred[:, n:], target[:, n:], self.beta, per_sample)
        if not n:
            return patch
        summary = (t.summary_loss or t.loss)(pred[:, :n], target[:, :n], self.beta, per_sample)
        return t.summary_weight * summary + (1 - t.summary_weight) * patch

    def _signals(self, predictions: dict[Pair, torch.Tensor], targets: TeacherTargets) -> dict[str, torch.Tensor]:
        """``cos/<target>``: cosine of the head's output and a feature-like target (mean over its blocks);
        ``attn/<target>/<student block>``: attention agreement of student and teacher at a relation block."""
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for t in self.targets:
                if t.feature_like:
                    out[f"cos/{t.name}"] = sum(signals.cosine(predictions[p], targets.values[p.source])
                                               for p in t.pairs) / len(t.pairs)
                    continue
                tm = self.teacher_pass.model(t.teacher)
                for p in t.pairs:
                    out[f"attn/{t.name}/{p.student}"] = signals.attention_agreement(
                        predictions[p], targets.values[p.source], float(self.student.blocks[p.student].attn.scale),
                        float(tm.blocks[p.teacher].attn.scale))
        return out

    # ---------------------------------------------------------------- what the task and the tools read

    @property
    def teachers(self) -> dict[str, nn.Module]:
        """name -> frozen teacher model (not submodules: see :mod:`hdcli.method.teacher`)."""
        return {name: t.model for name, t in self.teacher_pass.teachers.items()}

    @property
    def norms(self) -> nn.ModuleDict:
        """The running normalisers of the targets (``standardize``/``phis``), by loss term key."""
        return self.teacher_pass.norms

    @property
    def masking(self) -> Masking:
        return self.teacher_pass.masking

    @property
    def n_keep(self) -> int:
        """Patches the student sees of :attr:`num_patches` (static)."""
        return self.masking.keep_count(self.num_patches)

    def teacher_input(self, name: str, images: torch.Tensor) -> torch.Tensor:
        """``images`` (normalised for the student) as teacher ``name`` takes them: its own mean/std, size, dtype."""
        return self.teacher_pass.teachers[name].prepare(images)

    def head(self, target: str, block: int | None = None) -> nn.Module:
        """The head of a feature-like target by name (and teacher block for block/msa targets)."""
        t = next((t for t in self.targets if t.name == target), None)
        if t is None:
            raise HDError(f"no target named {target!r}", did_you_mean(target, [t.name for t in self.targets]))
        return self.heads[next(p.key for p in t.pairs if p.teacher == block)]

    @property
    def shared_block(self) -> int:
        """The deepest student block every target's loss depends on through all of its parameters (-1: only the
        embedding), where :func:`hdcli.method.signals.grad_shares` compares the targets. A value entering block i
        depends fully on blocks < i, one leaving it on blocks ≤ i, the final features on all."""
        last = {"enter": lambda b: b - 1, "leave": lambda b: b, "final": lambda b: vit.depth(self.student) - 1}
        return min(last[at(t, p, "student")](p.student) for t in self.targets for p in t.pairs)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of :attr:`shared_block` (the patch embedding when it is -1)."""
        b = self.shared_block
        module = self.student.blocks[b] if b >= 0 else self.student.patch_embed
        return [p for p in module.parameters() if p.requires_grad]


def check_reconstruction(targets: Sequence[Target], keep_set: bool) -> None:
    """Mask feature reconstruction takes final-feature targets only (no ladder) and no keep set (``keep_set``:
    whether the masking drops patches): HDError naming what is in the way."""
    bad = [t.name for t in targets if t.kind != "features" or t.student_blocks]
    if bad:
        raise HDError(f"mask feature reconstruction learns the teacher's final features; target {bad[0]} is not one",
                      "list only kind = \"features\" targets (no student_blocks) with distill.mask_reconstruction")
    if keep_set:
        raise HDError("mask feature reconstruction shows the student every patch position (masked ones as the mask "
                      "token), so it takes no keep set", "set distill.masking = \"none\"")


def masked_rows(predictions: dict[Pair, torch.Tensor], targets: TeacherTargets, mask: torch.Tensor,
                prefix: dict[str, int]) -> tuple[dict[Pair, torch.Tensor], TeacherTargets]:
    """Mask feature reconstruction: each term's student prediction and teacher target restricted to the masked
    patch rows (its ``prefix[target]`` prefix rows and the unmasked patches dropped). mask: bool [B, N] with the
    same count per image (SimMIM's) -> predictions and targets [B, M, D]."""
    idx = mask.nonzero()[:, 1].view(mask.shape[0], -1)  # [B, M] masked patch indices, ascending

    def rows(v: torch.Tensor, p: int) -> torch.Tensor:
        return v[:, p:].gather(1, idx.unsqueeze(-1).expand(-1, -1, v.shape[-1]))

    mine = {pair: rows(v, prefix[pair.target]) for pair, v in predictions.items()}
    values = {src: rows(v, prefix[src[0]]) for src, v in targets.values.items()}
    return mine, TeacherTargets(targets.keep, values)


def drop_teachers(losses: torch.Tensor, p: float) -> torch.Tensor:
    """UNIC's teacher dropping (``modeling/teacher_dropping.py``): which (feature target, image) losses count.

    losses: [T, B] each target's loss per image. Each entry is dropped with probability ``p`` (a uniform draw
    below ``p``), except the target with the highest loss of each image, which is always kept (so every image
    keeps at least one). -> [T, B] float, 1 = kept. The caller averages over the kept entries.
    """
    keep = (torch.rand(losses.shape, device=losses.device) >= p).float()  # [T, B]
    worst = losses.argmax(dim=0)  # [B]
    keep[worst, torch.arange(losses.shape[1], device=losses.device)] = 1.0
    return keep
