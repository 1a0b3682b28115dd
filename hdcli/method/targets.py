"""What is distilled: a :class:`Target` (which teacher, which kind of value, at which blocks, how compared), the
table of target kinds, and how one value is read from a model's hidden states on the tokens both sides share.

Kinds (METHOD.md; paper Tab. 5): ``features`` (the final features after the final norm), ``relations`` (q·kᵀ
entering each block, paper Eq. 2), ``block`` (the hidden state leaving each block), ``msa`` (the attention
branch's output). A new kind is an entry of :data:`KINDS` and its test in tests/test_targets.py.

Tokens (docs/method.md "Prefix tokens"): a target compares the kept patches plus the prefix tokens both
models have in the same role (:func:`match_prefix`): CLS with CLS; registers only when asked; a teacher
without CLS may give its pooled summary to the student's CLS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from hdcli.errors import HDError, did_you_mean
from hdcli.method.heads import HeadSpec
from hdcli.method.losses import LossSpec
from hdcli.method.norms import NORMS
from hdcli.models import vit

# ---------------------------------------------------------------- the kinds of target

@dataclass(frozen=True)
class Kind:
    """How one kind of target is read from a model (teacher or student).

    ``at``: the hidden state it starts from: ``enter`` (entering the block), ``leave`` (leaving it) or ``final``
    (``forward_features``: after every block and the final norm; no block index).
    ``read(block, h, rope, prefix)``: the value from that hidden state ([B, T, D] -> [B, T, D] or [B, H, T, T]);
    ``rope`` belongs to the patch tokens after the ``prefix`` first ones (``hdcli.models.vit``).
    ``gather_first``: restrict ``h`` to the compared tokens before ``read`` (it acts per token, or forms q·kᵀ
    of exactly those tokens) rather than after (attention mixes all tokens).
    ``feature_like``: the student's value goes through a head and the teacher's is normalised (METHOD.md),
    and the loss counts towards ``loss_feat``; otherwise towards ``loss_rel``.
    """

    at: str
    read: Callable[[nn.Module | None, torch.Tensor, torch.Tensor | None, int], torch.Tensor]
    gather_first: bool
    feature_like: bool


def _itself(block, h, rope, prefix):
    return h


def _msa(block, h, rope, prefix):
    return vit.msa(block, h, rope)


KINDS: dict[str, Kind] = {
    "features": Kind("final", _itself, gather_first=True, feature_like=True),
    "relations": Kind("enter", vit.relations, gather_first=True, feature_like=False),
    "block": Kind("leave", _itself, gather_first=True, feature_like=True),
    "msa": Kind("enter", _msa, gather_first=False, feature_like=True),
}


# ---------------------------------------------------------------- a target and its loss terms

class Pair(NamedTuple):
    """One term of a target's loss: the teacher's value at ``teacher`` block against the student's at ``student``
    block (both None for ``features``). ``key``: the name of its head and normaliser in ``state_dict``."""

    target: str
    teacher: int | None
    student: int | None
    key: str

    @property
    def source(self) -> tuple[str, int | None]:
        """What the teacher side gives this term: (target name, teacher block), whatever the student's block."""
        return self.target, self.teacher

    @property
    def source_key(self) -> str:
        """The name of the target normaliser of :attr:`source` in ``state_dict`` (``key`` without a ladder's
        student block)."""
        base = self.target.replace("/", "_").replace(".", "_")
        return base if self.teacher is None else f"{base}_{self.teacher}"


@dataclass(frozen=True)
class Target:
    """One distillation target: what to take from which teacher, where, and how it is compared.

    ``teacher``: the teacher's name; ``kind``: a key of :data:`KINDS`; ``blocks``: the teacher's blocks (empty
    for ``features``); ``student_blocks``: the matching student blocks (default: the same indices; for
    ``features``, student blocks whose outputs each learn the final features through a head of their own: a
    "ladder", as UNIC's). The loss over several blocks is their mean, times ``weight``. ``name`` defaults to
    ``"<teacher>/<kind>"`` (the key in ``out.parts`` and in the logged ``part/<name>``). ``norm``: how a
    feature-like target is normalised (``norms.NORMS``); ``head``: how the student's tokens reach its width
    (``heads.HeadSpec``: a name or a table); ``loss``: how the two are compared (``losses.LossSpec``: a name or
    a weighted mix). ``summary_loss`` / ``patch_loss`` (feature-like targets): other losses for the summary row
    (the student's CLS: the teacher's CLS or pooled summary) and for the other rows, weighted ``summary_weight``
    and 1 − ``summary_weight`` (either left out: ``loss``). ``registers`` also matches register tokens;
    ``pooled`` gives the student's CLS a teacher's pooled summary where the teacher has no CLS (``features``).
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
    head: HeadSpec | str | dict = "linear"
    loss: LossSpec | str | dict | list = "smooth_l1"
    summary_loss: LossSpec | str | dict | list | None = None
    patch_loss: LossSpec | str | dict | list | None = None
    summary_weight: float = 0.5

    def __post_init__(self):
        for what, value, table in (("kind", self.kind, KINDS), ("norm", self.norm, NORMS)):
            if value not in table:
                raise HDError(f"unknown target {what} {value!r}", f"use one of: {', '.join(table)}"
                              + (f" ({did_you_mean(str(value), table)})" if did_you_mean(str(value), table) else ""))
        object.__setattr__(self, "head", HeadSpec.of(self.head))
        for what in ("loss", "summary_loss", "patch_loss"):
            if getattr(self, what) is not None:
                object.__setattr__(self, what, LossSpec.of(getattr(self, what)))
        if self.norm != "layernorm" and not self.feature_like:
            raise HDError(f"norm = {self.norm!r} applies to feature-like targets, not {self.kind}",
                          "relations are compared as they are (METHOD.md): leave norm out")
        if (self.summary_loss or self.patch_loss) and not self.feature_like:
            raise HDError(f"summary_loss / patch_loss apply to feature-like targets, not {self.kind}",
                          "give relations one loss")
        w = self.summary_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w <= 1:
            raise HDError(f"summary_weight must lie in [0, 1], got {w!r}")
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if self.student_blocks is not None:
            object.__setattr__(self, "student_blocks", tuple(int(b) for b in self.student_blocks))
        if any(b < 0 for b in (*self.blocks, *(self.student_blocks or ()))):
            raise HDError(f"blocks are 0-based indices, got {list(self.blocks)} / {self.student_blocks}",
                          "paper layer i is block i-1")
        if self.name is None:
            object.__setattr__(self, "name", f"{self.teacher}/{self.kind}")

    @property
    def feature_like(self) -> bool:
        return KINDS[self.kind].feature_like

    @property
    def s_blocks(self) -> tuple[int, ...]:
        return self.blocks if self.student_blocks is None else self.student_blocks

    @property
    def pairs(self) -> tuple[Pair, ...]:
        """The loss terms: one (None, None) for ``features`` (or one (None, s) per student block of a ladder), else
        one per (teacher block, student block)."""
        key = self.name.replace("/", "_").replace(".", "_")
        if KINDS[self.kind].at == "final":
            if self.student_blocks:  # a ladder: each student block's output, its own head, to the final features
                return tuple(Pair(self.name, None, bs, f"{key}_s{bs}") for bs in self.student_blocks)
            return (Pair(self.name, None, None, key),)
        return tuple(Pair(self.name, bt, bs, f"{key}_{bt}") for bt, bs in zip(self.blocks, self.s_blocks, strict=True))

    @property
    def split(self) -> bool:
        """Whether the summary row and the other rows have losses of their own."""
        return self.summary_loss is not None or self.patch_loss is not None


TARGET_KEYS = tuple(f for f in Target.__dataclass_fields__)  # the keys of a [[distill.targets]] entry


# ---------------------------------------------------------------- which tokens both sides compare

class TokenMatch(NamedTuple):
    """The prefix tokens a target compares: positions in the teacher's and the student's prefix, and whether the
    student's CLS gets the teacher's pooled summary (the teacher then lists no position for it)."""

    teacher: tuple[int, ...]
    student: tuple[int, ...]
    pooled: bool


def match_prefix(teacher: Sequence[str], student: Sequence[str], *, registers: bool = False,
                 pooled: bool = False) -> TokenMatch:
    """Match prefix tokens by role (``vit.prefix_roles``, e.g. ``("cls", "reg", "reg")``): CLS with CLS when both
    have one; with ``pooled`` and a teacher without CLS, the student's CLS with the teacher's pooled summary;
    registers in order when ``registers`` (equal counts needed)."""
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
    return TokenMatch(tuple(t_pos), tuple(s_pos), use_pooled)


# ---------------------------------------------------------------- reading targets from a model's hidden states

@dataclass
class Hidden:
    """The hidden states one forward through a model's blocks kept for its targets (``vit.run_blocks``)."""

    model: nn.Module
    rope: torch.Tensor | None
    entering: dict[int, torch.Tensor] = field(default_factory=dict)
    leaving: dict[int, torch.Tensor] = field(default_factory=dict)
    features: torch.Tensor | None = None

    @classmethod
    def run(cls, model: nn.Module, x: torch.Tensor, rope: torch.Tensor | None, wants: Iterable[tuple[str, int | None]],
            *, checkpoint: bool = False) -> Hidden:
        """Run ``model`` on the embedded ``x`` only as far as ``wants`` needs: (at, block) pairs, ``at`` as
        :attr:`Kind.at` (``("final", None)`` for the final features)."""
        wanted = {"enter": set(), "leave": set(), "final": set()}
        for at, block in wants:
            wanted[at].add(block)
        entering, leaving, features = vit.run_blocks(model, x, rope, enter=wanted["enter"], leave=wanted["leave"],
                                                     final=bool(wanted["final"]), checkpoint=checkpoint)
        return cls(model, rope, entering, leaving, features)

    def at(self, at: str, block: int | None) -> torch.Tensor:
        return self.features if at == "final" else (self.entering if at == "enter" else self.leaving)[block]


def at(target: Target, pair: Pair, side: str) -> str:
    """Where ``pair``'s value starts on ``side``: the kind's hidden state, except a ladder's student side (a
    ``features`` target read from a student block's output)."""
    if side == "student" and target.kind == "features" and pair.student is not None:
        return "leave"
    return KINDS[target.kind].at


def wants(target: Target, side: str) -> list[tuple[str, int | None]]:
    """The hidden states ``target`` reads on ``side`` (``"teacher"`` or ``"student"``), for :meth:`Hidden.run`."""
    return [(at(target, p, side), getattr(p, side)) for p in target.pairs]


def teacher_value(target: Target, run: Hidden, pair: Pair, keep: torch.Tensor, match: TokenMatch) -> torch.Tensor:
    """The teacher's raw value for ``pair`` on its matched prefix tokens + the kept patches ``keep`` [B, n]:
    [B, P'+n, D] or [B, H, P'+n, P'+n]; a pooled summary (``match.pooled``) comes first."""
    kind, model = KINDS[target.kind], run.model
    p = vit.num_prefix(model)
    block = None if pair.teacher is None else model.blocks[pair.teacher]
    h = run.at(kind.at, pair.teacher)  # [B, P+N, D]
    if kind.gather_first:
        v = kind.read(block, vit.gather_tokens(h, keep, p, match.teacher), vit.gather_rope(run.rope, keep),
                      len(match.teacher))
    else:
        v = vit.gather_tokens(kind.read(block, h, run.rope, p), keep, p, match.teacher)
    if match.pooled:  # the student's CLS learns the pooled summary of a teacher without one
        summary = vit.pooled(model, run.leaving[vit.depth(model) - 1])  # [B, D]
        v = torch.cat([summary[:, None].to(v.dtype), v], dim=1)
    return v


def student_value(target: Target, run: Hidden, pair: Pair, match: TokenMatch) -> torch.Tensor:
    """The student's value for ``pair`` (it already holds only the kept patches): its matched prefix tokens,
    then every patch token."""
    kind, model = KINDS[target.kind], run.model
    p = vit.num_prefix(model)
    block = None if pair.student is None else model.blocks[pair.student]
    h = run.at(at(target, pair, "student"), pair.student)  # [B, P+n, D]
    if kind.gather_first:
        return kind.read(block, vit.select_prefix(h, p, match.student), run.rope, len(match.student))
    return vit.select_prefix(kind.read(block, h, run.rope, p), p, match.student)


def head_mean(r: torch.Tensor) -> torch.Tensor:
    """``relation_heads="mean"``: relations averaged over heads. [B, H, T, T] -> [B, 1, T, T]."""
    return r.mean(dim=1, keepdim=True)
