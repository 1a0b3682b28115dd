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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hdcli import masking as masking_lib
from hdcli import norms
from hdcli.config import RELATION_HEADS
from hdcli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from hdcli.errors import HDError, did_you_mean
from hdcli.models import vit
from hdcli.watch import signals as watch


@dataclass(frozen=True)
class Target:
    """One distillation target: what to take from which teacher, where, and with what weight.

    kind: ``features`` (final features after the final norm; ``blocks`` must be empty),
    ``relations`` (q·kᵀ entering each block of ``blocks``), ``block`` (hidden state leaving each
    block), ``msa`` (attention branch output of each block). ``student_blocks`` are the matching
    student blocks (default: the same indices). Losses over several blocks are averaged, then
    multiplied by ``weight``. ``name`` defaults to ``"<teacher>/<kind>"`` (the key in ``out.parts``).

    Tokens (docs/method.md "Prefix tokens"): the kept patches, plus the CLS token when both models have one;
    ``registers`` also matches register tokens (equal counts needed). ``pooled``: a ``features`` target of a
    teacher without a class token gives the student's CLS the teacher's pooled summary (its MAP / average
    pool). ``norm``: how a feature-like target is normalised (``hdcli.norms``: layernorm | standardize | phis).
    """

    teacher: str
    kind: str
    blocks: tuple[int, ...] = ()
    weight: float = 1.0
    student_blocks: tuple[int, ...] | None = None
    name: str | None = None
    norm: str = "layernorm"
    registers: bool = False
    pooled: bool = True

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if self.student_blocks is not None:
            object.__setattr__(self, "student_blocks", tuple(int(b) for b in self.student_blocks))
        if self.name is None:
            object.__setattr__(self, "name", f"{self.teacher}/{self.kind}")

    @property
    def feature_like(self) -> bool:
        """Features, block and msa targets go into ``loss_feat`` through a linear head; relations do not."""
        return TAPS[self.kind].feature_like

    @property
    def s_blocks(self) -> tuple[int, ...]:
        return self.blocks if self.student_blocks is None else self.student_blocks

    @property
    def pairs(self) -> list[tuple[int | None, int | None]]:
        """(teacher block, student block) pairs of the loss; one pair (None, None) for ``features``."""
        if TAPS[self.kind].at == "final":
            return [(None, None)]
        return list(zip(self.blocks, self.s_blocks, strict=True))


@dataclass
class DistillOutput:
    """loss = loss_feat + loss_rel (both already weighted); keep [B, n] kept patch indices (ascending,
    0-based, CLS excluded); parts: unweighted loss of each target by name; signals: per-target signals
    (``Distiller.detail``), e.g. ``cos/<target>`` and ``attn/<target>/<block>``."""

    loss: torch.Tensor
    loss_feat: torch.Tensor
    loss_rel: torch.Tensor
    keep: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    signals: dict[str, torch.Tensor] = field(default_factory=dict)


# a pytree node, so that DDP (find_unused_parameters / static_graph) and torch.compile see its tensors
try:
    from torch.utils._pytree import register_dataclass as _register_dataclass
except ImportError:  # older torch
    from torch.export import register_dataclass as _register_dataclass
_register_dataclass(DistillOutput)


# ---------------------------------------------------------------- the kinds of target (one table, both passes)

@dataclass(frozen=True)
class Tap:
    """How one kind of target is read from a model (teacher or student) at a block.

    ``at``: which hidden state the tap starts from: ``enter`` (entering the block), ``leave`` (leaving it)
    or ``final`` (``forward_features``: after all blocks and the final norm; no block index).
    ``fn(block, h, rope, prefix)``: the value from that hidden state ([B, T, D] -> [B, T, D] or [B, H, T, T]);
    ``rope`` belongs to the patch tokens after the ``prefix`` first ones (``hdcli.models.vit``).
    ``gather_first``: restrict ``h`` to the target's tokens (prefix + kept) before ``fn`` (``fn`` acts per
    token, or q·kᵀ restricted to those rows and columns) rather than after (attention mixes all tokens).
    ``feature_like``: the student's value goes through a linear head and the teacher's is LayerNormed
    (METHOD.md), and the loss counts towards ``loss_feat``; otherwise towards ``loss_rel``.
    """

    at: str
    fn: Callable[[nn.Module | None, torch.Tensor], torch.Tensor]
    gather_first: bool
    feature_like: bool


TAPS: dict[str, Tap] = {
    "features": Tap("final", lambda block, h, rope, prefix: h, gather_first=True, feature_like=True),
    "relations": Tap("enter", vit.relations, gather_first=True, feature_like=False),
    "block": Tap("leave", lambda block, h, rope, prefix: h, gather_first=True, feature_like=True),
    "msa": Tap("enter", lambda block, h, rope, prefix: vit.msa(block, h, rope), gather_first=False, feature_like=True),
}
KINDS = tuple(TAPS)


# ---------------------------------------------------------------- losses (pure functions, METHOD.md "Loss")

def smooth_l1(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """SmoothL1 with ``beta``, mean over all elements, computed in fp32 whatever the autocast dtype."""
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta)


normalize_target = norms.layernorm  # the paper's normalisation of a feature-like target


def match_prefix(teacher: Sequence[str], student: Sequence[str], *, registers: bool = False,
                 pooled: bool = False) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """Which prefix tokens of a teacher and of the student a target compares, matched by role.

    teacher/student: prefix roles (``vit.prefix_roles``, e.g. ``("cls", "reg", "reg")``). Returns (teacher
    positions, student positions, use_pooled): CLS with CLS when both have one; with ``pooled`` and a teacher
    without CLS, the student's CLS is compared with the teacher's pooled summary (use_pooled True, the student
    position listed, no teacher position); registers in order when ``registers`` (equal counts needed).
    """
    t_pos: list[int] = []
    s_pos: list[int] = []
    use_pooled = False
    if "cls" in teacher and "cls" in student:
        t_pos.append(teacher.index("cls"))
        s_pos.append(student.index("cls"))
    elif pooled and "cls" in student:
        s_pos.append(student.index("cls"))
        use_pooled = True
    if registers:
        t_reg = [i for i, r in enumerate(teacher) if r == "reg"]
        s_reg = [i for i, r in enumerate(student) if r == "reg"]
        if len(t_reg) != len(s_reg):
            raise HDError(f"registers = true needs as many register tokens in the student ({len(s_reg)}) as in the "
                          f"teacher ({len(t_reg)})",
                          f"build the student with reg_tokens = {len(t_reg)} (student.kwargs), or leave registers out")
        t_pos += t_reg
        s_pos += s_reg
    return tuple(t_pos), tuple(s_pos), use_pooled


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
        self.mean, self.std = tuple(mean_t), tuple(std_t)
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
        student: a timm ViT of a supported family (``hdcli.models.vit``), randomly initialised; trained.
        teachers: name -> timm ViT of a supported family; frozen here (requires_grad False, eval) and kept out of the module
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

    ``forward(images)`` returns a ``DistillOutput``. With ``detail = True`` it also holds the per-target
    signals (``hdcli.watch.signals``: cosine of each feature-like target, attention agreement of each
    relation block), computed under ``no_grad`` from the step's own tensors. Teachers run under ``torch.no_grad`` (not
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
        self.detail = False  # also compute the per-target signals (logged steps only)
        self.student = student
        self.grid = tuple(int(g) for g in student.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.img_size = tuple(g * p for g, p in zip(self.grid, vit.patch_size(student), strict=True))
        self._teachers = self._adapt_teachers(teachers, targets, mask_teacher, input_mean, input_std)
        self.targets: tuple[Target, ...] = tuple(targets)
        self.heads = nn.ModuleDict(self._check_targets())
        self.tokens = {t.name: self._match(t) for t in self.targets}  # name -> (teacher pos, student pos, pooled)
        self.norms = nn.ModuleDict({_head_key(t, bt): norms.RunningNorm(t.norm, self._target_width(t, bt))
                                    for t in self.targets if t.norm != "layernorm" for bt, _ in t.pairs})
        self._setup_masking(mask_teacher, mask_blocks)

    def _adapt_teachers(self, teachers, targets, mask_teacher, mean_in, std_in) -> dict[str, _Teacher]:
        """Teachers validated, frozen and adapted to the student's grid; a plain dict (not registered)."""
        used = {t.teacher for t in targets} | ({mask_teacher} if mask_teacher else set())
        for name in used:
            if name not in teachers:
                raise HDError(f"no teacher named {name!r}", did_you_mean(name, list(teachers)))
        for name in teachers:
            if name not in used:
                raise HDError(f"teacher {name!r} is not used by any target", "drop it or add a target for it")
            if "." in name or not name:
                raise HDError(f"teacher name {name!r} must be non-empty and contain no '.'")
        return {name: _Teacher(m, name, self.grid, mean_in, std_in) for name, m in teachers.items()}

    def _check_targets(self) -> dict[str, nn.Linear]:
        """Kinds, blocks (in range for both models), widths and head counts; the heads of feature-like targets."""
        names = [t.name for t in self.targets]
        if len(set(names)) != len(names):
            raise HDError(f"duplicate target names {names}", "give repeated teacher/kind pairs a distinct name=")
        heads = {}
        s = self.student
        for t in self.targets:
            if t.kind not in TAPS:
                raise HDError(f"unknown target kind {t.kind!r}", did_you_mean(t.kind, KINDS))
            if t.norm not in norms.NORMS:
                raise HDError(f"target {t.name}: unknown norm {t.norm!r}", did_you_mean(t.norm, norms.NORMS))
            if t.norm != "layernorm" and not t.feature_like:
                raise HDError(f"target {t.name}: norm = {t.norm!r} applies to feature-like targets, not relations",
                              "relations are compared as they are (METHOD.md): leave norm out")
            tm = self._teachers[t.teacher].model
            if TAPS[t.kind].at == "final":
                if t.blocks or t.student_blocks:
                    raise HDError(f"target {t.name}: features are taken after the final norm, not at blocks",
                                  "use kind='block' for the output of an intermediate block")
                heads[_head_key(t)] = _linear(vit.width(s), self._target_width(t, None))
                continue
            if not t.blocks:
                raise HDError(f"target {t.name} needs at least one block")
            vit.check_blocks(tm, t.blocks, f"teacher {t.teacher!r}", f"{t.kind} block")
            vit.check_blocks(s, t.s_blocks, "the student", f"{t.kind} block")
            if t.kind in ("relations", "msa"):
                vit.check_attention(tm, t.blocks, f"teacher {t.teacher!r}", f"target {t.name}")
                vit.check_attention(s, t.s_blocks, "the student", f"target {t.name}")
            if len(t.s_blocks) != len(t.blocks):
                raise HDError(f"target {t.name}: {len(t.blocks)} teacher blocks but {len(t.s_blocks)} student blocks",
                              "give one student block per teacher block")
            for bt, bs in t.pairs:
                if not t.feature_like:  # relations: R is [B, H, T, T] on both sides
                    ht, hs = vit.num_heads(tm, bt), vit.num_heads(s, bs)
                    if ht != hs and self.relation_heads != "mean":
                        raise HDError(f"teacher {t.teacher!r} has {ht} heads at block {bt}, the student {hs} at "
                                      f"block {bs}", "relations need equal head counts; pass relation_heads='mean' "
                                      "to average over heads")
                else:
                    heads[_head_key(t, bt)] = _linear(vit.width(s), self._target_width(t, bt))
        return heads

    def _match(self, t: Target) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
        """The prefix tokens target ``t`` compares (``match_prefix``); the pooled summary for ``features`` only."""
        tm = self._teachers[t.teacher].model
        match = match_prefix(vit.prefix_roles(tm), vit.prefix_roles(self.student), registers=t.registers,
                             pooled=t.pooled and t.kind == "features")
        if match[2] and getattr(tm, "global_pool", "") in ("", None):
            raise HDError(f"target {t.name}: the teacher has no class token and no pooling (global_pool='')",
                          "set pooled = false for this target, or load the teacher with its own global_pool")
        if match[2] and vit.pooled_width(tm) != tm.num_features:
            raise HDError(f"target {t.name}: the teacher's pooled summary has {vit.pooled_width(tm)} channels but its "
                          f"tokens {tm.num_features}", "set pooled = false for this target")
        return match

    def _target_width(self, t: Target, block: int | None) -> int:
        """Channels of a feature-like target: the final features' (``block`` None) or a block's hidden width."""
        tm = self._teachers[t.teacher].model
        return int(tm.num_features) if block is None else vit.width(tm)

    def _setup_masking(self, mask_teacher: str | None, mask_blocks: Sequence[int]) -> None:
        """Which teacher chooses the kept tokens, at which blocks, and the static keep count."""
        self.mask_teacher = mask_teacher
        self.mask_blocks = tuple(sorted(set(int(b) for b in mask_blocks)))
        self.schedule = masking_lib.keep_schedule(self.num_patches, self.drop_ratio, len(self.mask_blocks))
        self.n_keep = self.schedule[-1] if self.schedule else self.num_patches
        if self.mask_teacher_blocks:
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

    @property
    def mask_teacher_blocks(self) -> tuple[int, ...]:
        """The mask teacher's blocks whose entering hidden states choose the keep set: all mask blocks for
        progressive masking, the last one for direct masking, none when nothing is dropped or the keep
        set does not look at the data (random, none)."""
        if self.masking not in ("progressive", "direct") or self.n_keep >= self.num_patches:
            return ()
        return self.mask_blocks if self.masking == "progressive" else self.mask_blocks[-1:]

    def renormalised(self) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
        """name -> (mean, std) of each teacher that expects other input statistics than the student's: its
        inputs are re-normalised (``teacher_input``)."""
        return {name: (t.mean, t.std) for name, t in self._teachers.items() if t.renorm}

    def teacher_input(self, name: str, images: torch.Tensor) -> torch.Tensor:
        """``images`` (normalised for the student) as teacher ``name`` takes them: its own mean/std, size, dtype."""
        return self._teachers[name].prepare(images)

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

    # ---------------------------------------------------------------- forward = teacher pass + student pass

    def forward(self, images: torch.Tensor) -> DistillOutput:
        """images: float [B, 3, H, W], normalised with ``input_mean/input_std`` -> DistillOutput."""
        if tuple(images.shape[-2:]) != self.img_size:
            raise HDError(f"images are {tuple(images.shape[-2:])} px but the student expects {self.img_size}",
                          "resize the data to the student's img_size (the keep sets and teachers are set up for it)")
        return self.student_pass(images, self.teacher_pass(images))

    def teacher_pass(self, images: torch.Tensor) -> TeacherTargets:
        """Run each teacher as far as its targets need (under ``no_grad``): the keep set and the targets.

        The mask teacher runs first on the full sequence (the mask is bookkeeping only); its hidden
        states at the mask blocks give the keep set, then every tap is restricted to CLS + kept.
        """
        with torch.no_grad():
            order = sorted(self._teachers, key=lambda n: n != self.mask_teacher)  # mask teacher first
            runs: dict[str, _Taps] = {}
            for name in order:
                extra = self.mask_teacher_blocks if name == self.mask_teacher else ()
                targets = [t for t in self.targets if t.teacher == name]
                if targets or extra:  # e.g. a mask teacher under random/none masking: nothing to compute
                    model = self._teachers[name].model
                    last = [vit.depth(model) - 1] if any(self.tokens[t.name][2] for t in targets) else []
                    runs[name] = _Taps.of(model, *vit.embed(model, self.teacher_input(name, images)),
                                          [(t.kind, bt) for t in targets for bt, _ in t.pairs], enter=extra, leave=last)
            keep = self._keep(runs, images)
            values: dict[tuple[str, int | None], torch.Tensor] = {}
            for t in self.targets:
                tap, run = TAPS[t.kind], runs[t.teacher]
                p = vit.num_prefix(run.model)
                take, _, use_pooled = self.tokens[t.name]  # all prefix tokens (MAE, CLIP): a plain slice
                for bt, _ in t.pairs:
                    block = None if bt is None else run.model.blocks[bt]
                    h = run.at(tap.at, bt)  # [B, P+N, D]
                    if tap.gather_first:  # [B, P'+n, D] or [B, H, P'+n, P'+n]
                        v = tap.fn(block, vit.gather_tokens(h, keep, p, take), vit.gather_rope(run.rope, keep),
                                   len(take))
                    else:
                        v = vit.gather_tokens(tap.fn(block, h, run.rope, p), keep, p, take)  # [B, P'+n, D]
                    if use_pooled:  # the student's CLS learns the pooled summary of a teacher without one
                        summary = vit.pooled(run.model, run.leaving[vit.depth(run.model) - 1])  # [B, D]
                        v = torch.cat([summary[:, None].to(v.dtype), v], dim=1)
                    values[(t.name, bt)] = self._normalise(t, bt, v) if tap.feature_like else self._heads_of(v)
        return TeacherTargets(keep=keep, values=values)

    def _normalise(self, t: Target, block: int | None, v: torch.Tensor) -> torch.Tensor:
        """A feature-like teacher target as the loss compares it (``t.norm``, ``hdcli.norms``)."""
        return normalize_target(v) if t.norm == "layernorm" else self.norms[_head_key(t, block)](v)

    def student_pass(self, images: torch.Tensor, targets: TeacherTargets) -> DistillOutput:
        """The student on CLS + kept tokens only (gathered before block 0), its taps, and the loss against
        ``targets`` (what ``teacher_pass`` returned for the same images)."""
        keep = targets.keep
        s = self.student
        x, rope = vit.embed_kept(s, images, None if keep.shape[1] == self.num_patches else keep)  # [B, P+n, D]
        ckpt = bool(getattr(s, "grad_checkpointing", False)) and self.training
        run = _Taps.of(s, x, rope, [(t.kind, bs) for t in self.targets for _, bs in t.pairs], checkpoint=ckpt)
        p = vit.num_prefix(s)
        mine: dict[tuple[str, int | None], torch.Tensor] = {}
        for t in self.targets:
            tap = TAPS[t.kind]
            take = self.tokens[t.name][1]
            for _, bs in t.pairs:
                block = None if bs is None else s.blocks[bs]
                h = run.at(tap.at, bs)  # [B, P+n, D]
                if tap.gather_first:
                    v = tap.fn(block, vit.select_prefix(h, p, take), rope, len(take))
                else:
                    v = vit.select_prefix(tap.fn(block, h, rope, p), p, take)
                mine[(t.name, bs)] = v if tap.feature_like else self._heads_of(v)
        return self.loss(mine, targets)

    def loss(self, student: dict, targets: TeacherTargets) -> DistillOutput:
        """L = L_feat + L_rel (METHOD.md "Loss"): each target's SmoothL1 averaged over its block pairs, the
        student's feature-like taps through their linear heads, weighted and summed by kind."""
        loss_feat = targets.keep.new_zeros((), dtype=torch.float32)
        loss_rel = targets.keep.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for t in self.targets:
            part = sum(smooth_l1(self.heads[_head_key(t, bt)](student[(t.name, bs)]) if t.feature_like
                                 else student[(t.name, bs)], targets.values[(t.name, bt)], self.beta)
                       for bt, bs in t.pairs) / len(t.pairs)
            parts[t.name] = part
            if t.feature_like:
                loss_feat = loss_feat + t.weight * part
            else:
                loss_rel = loss_rel + t.weight * part
        return DistillOutput(loss=loss_feat + loss_rel, loss_feat=loss_feat, loss_rel=loss_rel, keep=targets.keep,
                             parts=parts, signals=self._signals(student, targets) if self.detail else {})

    def _signals(self, student: dict, targets: TeacherTargets) -> dict[str, torch.Tensor]:
        """``cos/<target>``: cosine of the student head's output and a feature-like target (mean over its
        blocks); ``attn/<target>/<block>``: attention agreement of student and teacher at a relation block."""
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for t in self.targets:
                if t.feature_like:
                    out[f"cos/{t.name}"] = sum(
                        watch.cosine(self.heads[_head_key(t, bt)](student[(t.name, bs)]), targets.values[(t.name, bt)])
                        for bt, bs in t.pairs) / len(t.pairs)
                    continue
                tm = self._teachers[t.teacher].model
                for bt, bs in t.pairs:
                    out[f"attn/{t.name}/{bs}"] = watch.attention_agreement(
                        student[(t.name, bs)], targets.values[(t.name, bt)], float(self.student.blocks[bs].attn.scale),
                        float(tm.blocks[bt].attn.scale))
        return out

    @property
    def shared_block(self) -> int:
        """The deepest student block every target's loss depends on through all of its parameters (-1: only
        the embedding): the block at which ``hdcli.watch.signals.grad_shares`` compares the targets. A tap
        entering block i depends fully on blocks < i, one leaving it on blocks ≤ i, the features on all."""
        last = {"enter": lambda b: b - 1, "leave": lambda b: b, "final": lambda b: vit.depth(self.student) - 1}
        return min(last[TAPS[t.kind].at](bs) for t in self.targets for _, bs in t.pairs)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of :attr:`shared_block` (the patch embedding when it is -1)."""
        b = self.shared_block
        module = self.student.blocks[b] if b >= 0 else self.student.patch_embed
        return [p for p in module.parameters() if p.requires_grad]

    def _heads_of(self, r: torch.Tensor) -> torch.Tensor:
        return head_mean(r) if self.relation_heads == "mean" else r

    def _keep(self, runs: dict[str, _Taps], images: torch.Tensor) -> torch.Tensor:
        """The keep set [B, n_keep]: from the mask teacher's patch tokens entering its mask blocks, or drawn."""
        blocks = self.mask_teacher_blocks
        if blocks:
            run = runs[self.mask_teacher]
            p = vit.num_prefix(run.model)
            hiddens = [run.entering[i][:, p:] for i in blocks]  # [B, N, D] patch tokens entering each mask block
            return masking_lib.keep_set(self.masking, hiddens, self.drop_ratio, steps=len(self.mask_blocks),
                                        schedule=self.schedule)
        return masking_lib.keep_set(self.masking, [], self.drop_ratio, batch=images.shape[0], n=self.num_patches,
                                    steps=len(self.mask_blocks), device=images.device, schedule=self.schedule)


@dataclass
class TeacherTargets:
    """What ``Distiller.teacher_pass`` gives the student pass: the keep set [B, n] and the normalised targets
    by (target name, teacher block), the block None for ``features``."""

    keep: torch.Tensor
    values: dict[tuple[str, int | None], torch.Tensor]


@dataclass
class _Taps:
    """The hidden states one forward through a model's blocks kept for its taps (``vit.run_blocks``)."""

    model: nn.Module
    rope: torch.Tensor | None
    entering: dict[int, torch.Tensor]
    leaving: dict[int, torch.Tensor]
    features: torch.Tensor | None

    @classmethod
    def of(cls, model: nn.Module, x: torch.Tensor, rope: torch.Tensor | None, taps: Sequence[tuple[str, int | None]],
           *, enter: Sequence[int] = (), leave: Sequence[int] = (), checkpoint: bool = False) -> _Taps:
        """Run ``model`` on the embedded ``x`` (its patches' ``rope``) only as far as the (kind, block) ``taps``,
        ``enter`` and ``leave`` need."""
        wants = {"enter": set(enter), "leave": set(leave), "final": False}
        for kind, b in taps:
            at = TAPS[kind].at
            if at == "final":
                wants["final"] = True
            else:
                wants[at].add(b)
        return cls(model, rope, *vit.run_blocks(model, x, rope, enter=wants["enter"], leave=wants["leave"],
                                                final=wants["final"], checkpoint=checkpoint))

    def at(self, where: str, block: int | None) -> torch.Tensor:
        return self.features if where == "final" else (self.entering if where == "enter" else self.leaving)[block]


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

    The loss (paper Eq. 3; METHOD.md "Loss"), over the CLS + kept tokens T' chosen from the MIM teacher's
    blocks ``mask_blocks`` (Eq. 4):

        L = L_feat + α · L_rel
        L_feat = SmoothL1_β( h(x_S^L),  LN(x_T^L) )                        feature teacher T, head h
        L_rel  = 1/|B| Σ_{i ∈ B} SmoothL1_β( q_S^i k_S^iᵀ,  q_M^i k_M^iᵀ )   MIM teacher M, blocks B

    ``out.loss_feat`` and ``out.loss_rel`` are the two terms (α already applied to the second).

    Teachers are named ``"feature"`` and ``"mim"``; targets ``"feature/features"`` and ``"mim/relations"``.
    ``student_relation_blocks`` (default: ``relation_blocks``) are the student's blocks for the relations;
    ``target_norm`` how the features are normalised (``hdcli.norms``; the paper's LayerNorm by default).
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
        target_norm: str = "layernorm",
    ):
        targets = [
            Target("feature", "features", norm=target_norm),
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
