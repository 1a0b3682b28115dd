"""Keep sets for the student: which patch tokens it sees (paper Sec. 3.2, Tab. 8; METHOD.md "masking").

Tensors in, index tensors out. Patch indices are 0-based and exclude CLS (CLS is never dropped);
every keep set is sorted ascending. Keep counts depend only on the number of patches and the
settings, never on the data, so shapes stay static (``torch.compile`` compiles once, no host syncs).
:class:`Masking` holds the settings and is the one place that decides whether anything is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

from hdcli.errors import HDError, did_you_mean
from hdcli.method.names import MASKING as STRATEGIES
from hdcli.method.names import paper_blocks


def check_strategy(masking: str) -> str:
    if masking not in STRATEGIES:
        raise HDError(f"unknown masking strategy {masking!r}", did_you_mean(masking, STRATEGIES))
    return masking


def check_drop_ratio(drop_ratio: float) -> float:
    if not 0.0 <= float(drop_ratio) < 1.0:
        raise HDError(f"drop ratio {drop_ratio} is outside [0, 1)", "use e.g. 0.3 (the paper's default)")
    return float(drop_ratio)


def step_count(n: int, drop_ratio: float) -> int:
    """Tokens kept by one masking step: n' = floor(n·(1 − r) + 0.5), at least 1 (METHOD.md).

    In exact rational arithmetic, with r read as the decimal it was written as (0.3 = 3/10): in floats
    45·(1 − 0.3) + 0.5 is 31.9999…, which would floor to 31 where METHOD.md's formula gives 32.
    """
    r = Fraction(repr(float(drop_ratio)))  # the shortest decimal that round-trips: 0.3 -> 3/10
    return max(1, math.floor(n * (1 - r) + Fraction(1, 2)))


def keep_count(n: int, drop_ratio: float, steps: int) -> int:
    """Tokens kept after ``steps`` masking steps from ``n`` patches (196, 0.3, 3 -> 67)."""
    return keep_schedule(n, drop_ratio, steps)[-1] if steps else n


def keep_schedule(n: int, drop_ratio: float, steps: int) -> tuple[int, ...]:
    """The count after each of ``steps`` masking steps (196, 0.3, 3 -> (137, 96, 67)). Computed once, outside
    any compiled graph (``torch.compile`` does not trace the rational arithmetic), and passed to
    :func:`keep_set` as ``schedule``."""
    counts = []
    for _ in range(steps):
        n = step_count(n, drop_ratio)
        counts.append(n)
    return tuple(counts)


def all_patches(batch: int, n: int, device=None) -> torch.Tensor:
    """The keep set of the ``none`` strategy: every patch. -> [B, N] int64."""
    return torch.arange(n, device=device).expand(batch, n)


def drop_redundant(h: torch.Tensor, keep: torch.Tensor, n_keep: int) -> torch.Tensor:
    """One redundant-token masking step: of the kept patches, keep the ``n_keep`` least similar to their mean.

    h: [B, N, D] hidden patch tokens (CLS excluded) entering a mask block.
    keep: [B, n] current keep set, ascending.  Returns [B, n_keep], ascending.
    Ties in similarity keep the lower patch index (stable sort).
    """
    hk = h.gather(1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1])).float()  # [B, n, D], fp32 for the cosine
    m = hk.mean(dim=1, keepdim=True)  # [B, 1, D] mean of the kept tokens
    s = F.cosine_similarity(hk, m, dim=-1)  # [B, n] similarity to the mean
    order = torch.argsort(s, dim=1, stable=True)[:, :n_keep]  # [B, n_keep] least similar first
    return keep.gather(1, order).sort(dim=1).values  # [B, n_keep] patch indices, ascending


def progressive_keep(hiddens: Sequence[torch.Tensor], drop_ratio: float,
                     schedule: Sequence[int] | None = None) -> torch.Tensor:
    """Progressive masking: one ``drop_redundant`` step per hidden state, in order (paper Eq. 4).

    hiddens: the MIM teacher's patch tokens [B, N, D] entering each mask block (CLS excluded).
    Returns [B, keep_count(N, r, len(hiddens))], ascending.
    """
    b, n, _ = hiddens[0].shape
    schedule = keep_schedule(n, drop_ratio, len(hiddens)) if schedule is None else schedule
    keep = all_patches(b, n, hiddens[0].device)  # [B, N]
    for h, n_keep in zip(hiddens, schedule, strict=True):
        keep = drop_redundant(h, keep, n_keep)
    return keep


def direct_keep(h: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Direct masking: one step at the last mask block, straight to ``n_keep`` (Tab. 8 "Direct").

    h: [B, N, D] patch tokens entering the last mask block. -> [B, n_keep], ascending.
    """
    b, n, _ = h.shape
    return drop_redundant(h, all_patches(b, n, h.device), n_keep)


def random_keep(noise: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The ``n_keep`` patches of smallest ``noise`` per image, ascending: a uniformly random subset for uniform
    noise (Tab. 8 "Random"; MAE's ``random_masking``). noise [B, N] -> [B, n_keep]."""
    return noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values  # [B, n_keep]


@dataclass(frozen=True)
class Masking:
    """How the keep set is chosen: ``strategy`` (progressive | direct | random | none, Tab. 8), the fraction
    ``drop_ratio`` dropped per step, and the mask teacher's ``blocks`` entering which a step runs (the paper's
    0, 4, 8). ``direct`` and ``random`` keep as many tokens as ``progressive`` would."""

    strategy: str = "progressive"
    drop_ratio: float = 0.3
    blocks: tuple[int, ...] = paper_blocks().mask

    def __post_init__(self):
        check_strategy(self.strategy)
        object.__setattr__(self, "drop_ratio", check_drop_ratio(self.drop_ratio))
        object.__setattr__(self, "blocks", tuple(sorted({int(b) for b in self.blocks})))

    def schedule(self, n: int) -> tuple[int, ...]:
        """The count after each step from ``n`` patches (:func:`keep_schedule`), () when nothing is dropped."""
        return () if self.strategy == "none" else keep_schedule(n, self.drop_ratio, len(self.blocks))

    def keep_count(self, n: int) -> int:
        """Patches kept of ``n`` (static: never depends on the data)."""
        schedule = self.schedule(n)
        return schedule[-1] if schedule else n

    def drops(self, n: int) -> bool:
        """Whether anything is dropped of ``n`` patches (the one place that decides it)."""
        return self.keep_count(n) < n

    @property
    def needs_teacher(self) -> bool:
        """Whether a mask teacher's hidden states choose the keep set (progressive/direct dropping something)."""
        return self.strategy in ("progressive", "direct") and self.drop_ratio > 0 and bool(self.blocks)

    def teacher_blocks(self, n: int) -> tuple[int, ...]:
        """The mask teacher's blocks whose entering hidden states choose the keep set: every mask block for
        ``progressive``, the last for ``direct``, none when nothing is dropped or the data is not looked at."""
        if not self.needs_teacher or not self.drops(n):
            return ()
        return self.blocks if self.strategy == "progressive" else self.blocks[-1:]


def keep_set(masking: Masking, hiddens: Sequence[torch.Tensor], *, batch: int, n: int, device=None,
             schedule: Sequence[int] | None = None) -> torch.Tensor:
    """The keep set of ``masking`` for a batch of ``batch`` images of ``n`` patches. -> [B, n_keep] int64, ascending.

    ``hiddens``: the mask teacher's patch tokens [B, N, D] entering each of ``masking.teacher_blocks(n)`` (empty
    for random / none, or when nothing is dropped). ``schedule``: ``masking.schedule(n)`` computed once outside
    any compiled graph (``torch.compile`` does not trace the rational arithmetic).
    """
    schedule = masking.schedule(n) if schedule is None else tuple(schedule)
    n_keep = schedule[-1] if schedule else n
    if n_keep == n:
        return all_patches(batch, n, device)
    if masking.strategy == "random":
        return random_keep(torch.rand(batch, n, device=device), n_keep)
    if not hiddens:
        raise ValueError(f"{masking.strategy} masking needs the mask teacher's hidden states")
    if masking.strategy == "direct":
        return direct_keep(hiddens[-1], n_keep)
    return progressive_keep(hiddens, masking.drop_ratio, schedule)


# ---------------------------------------------------------------- mask feature reconstruction (paper Sec. 2.4)

SIMMIM_RATIO = 0.6  # SimMIM's mask ratio
SIMMIM_BLOCK_PX, PAPER_IMG = 32, 224  # SimMIM's 32-px mask patches, at the paper's input size


@dataclass(frozen=True)
class Reconstruction:
    """SimMIM-style masking for mask feature reconstruction (paper Sec. 2.4): the student sees every patch position,
    a ``ratio`` of them (in square blocks of ``block`` × ``block`` patches) replaced by a learned mask token, and
    learns the teacher's features at the masked positions only.

    ``block`` None: SimMIM's 32-px mask patch at the paper's 224 px, i.e. 1/7 of the image side, on the student's
    grid (2 patches at 224/16, as SimMIM's ViT; 1 patch on an 8 × 8 grid), lowered to a divisor of the grid."""

    ratio: float = SIMMIM_RATIO
    block: int | None = None

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise HDError(f"distill.mask_ratio must lie in (0, 1), got {self.ratio}", f"SimMIM uses {SIMMIM_RATIO}")
        if self.block is not None and (isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1):
            raise HDError(f"distill.mask_block is a positive number of patches, got {self.block!r}",
                          "leave it out for SimMIM's 32-px blocks scaled to the grid")

    def block_for(self, grid: tuple[int, int]) -> int:
        """The mask block's side in patches on ``grid`` (HDError when a given block does not divide it)."""
        if self.block is not None:
            if grid[0] % self.block or grid[1] % self.block:
                raise HDError(f"distill.mask_block {self.block} does not divide the student's {grid[0]}x{grid[1]} grid",
                              "give a divisor of the grid, or leave it out")
            return self.block
        side = max(1, round(min(grid) * SIMMIM_BLOCK_PX / PAPER_IMG))
        while grid[0] % side or grid[1] % side:
            side -= 1
        return side

    def count(self, grid: tuple[int, int]) -> int:
        """Masked patches per image (static): ceil(ratio × blocks) blocks of block² patches (SimMIM)."""
        b = self.block_for(grid)
        return math.ceil(self.ratio * (grid[0] // b) * (grid[1] // b)) * b * b


def block_mask(noise: torch.Tensor, grid: tuple[int, int], ratio: float, block: int) -> torch.Tensor:
    """SimMIM's mask generator on a batch: of the (rows/block) × (cols/block) mask blocks, the ceil(ratio × count)
    with the smallest ``noise`` are masked, each covering block × block patches.

    noise: [B, (rows/block)·(cols/block)] (uniform: a uniformly random choice) -> bool [B, rows·cols], patches
    row-major as timm orders them, True = masked."""
    bsz = noise.shape[0]
    r, c = grid[0] // block, grid[1] // block
    n_mask = math.ceil(ratio * r * c)
    chosen = noise.argsort(dim=1)[:, :n_mask]  # [B, n_mask]
    small = torch.zeros(bsz, r * c, dtype=torch.bool, device=noise.device).scatter_(1, chosen, True)
    return small.view(bsz, r, 1, c, 1).expand(bsz, r, block, c, block).reshape(bsz, grid[0] * grid[1])
