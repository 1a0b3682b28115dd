"""Keep sets for the student: which patch tokens it sees (paper Sec. 3.2, Tab. 8; METHOD.md "masking").

Tensors in, index tensors out. Patch indices are 0-based and exclude CLS (CLS is never dropped);
every keep set is sorted ascending. Keep counts depend only on the number of patches and the
settings, never on the data, so shapes stay static (``torch.compile`` compiles once, no host syncs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch
import torch.nn.functional as F

from hdcli.config import MASKING
from hdcli.errors import HDError, did_you_mean

STRATEGIES = MASKING  # the names are the config's (hdcli.config.MASKING)


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


def random_keep(batch: int, n: int, n_keep: int, device=None, generator=None) -> torch.Tensor:
    """A uniformly random subset of ``n_keep`` patches per image (Tab. 8 "Random"). -> [B, n_keep] ascending."""
    noise = torch.rand(batch, n, device=device, generator=generator)  # [B, N]
    return noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values  # [B, n_keep]


def keep_set(
    masking: str,
    hiddens: Sequence[torch.Tensor],
    drop_ratio: float,
    *,
    batch: int | None = None,
    n: int | None = None,
    steps: int | None = None,
    device=None,
    schedule: Sequence[int] | None = None,
) -> torch.Tensor:
    """The keep set of ``masking`` (progressive | direct | random | none). -> [B, n_keep] int64, ascending.

    ``hiddens`` are the mask teacher's patch tokens [B, N, D] entering each mask block (for ``direct``
    only the last one is used); ``random`` and ``none`` do not look at them and take ``batch``, ``n``
    and ``steps`` instead. ``steps`` = the number of mask blocks (default ``len(hiddens)``): ``direct``
    and ``random`` keep as many tokens as ``progressive`` would. When the final count equals
    N (drop ratio 0 or no mask blocks) every strategy returns all patches. ``schedule``: the precomputed
    :func:`keep_schedule` of (N, drop_ratio, steps), for callers inside a compiled graph.
    """
    check_strategy(masking)
    if hiddens:
        batch, n, device = hiddens[0].shape[0], hiddens[0].shape[1], hiddens[0].device
        steps = len(hiddens) if steps is None else steps
    if batch is None or n is None or steps is None:
        raise ValueError("keep_set needs hidden states or batch, n and steps")
    schedule = keep_schedule(n, drop_ratio, steps) if schedule is None else tuple(schedule)
    n_keep = schedule[-1] if schedule else n
    if masking == "none" or n_keep == n:
        return all_patches(batch, n, device)
    if masking == "random":
        return random_keep(batch, n, n_keep, device)
    if not hiddens:
        raise ValueError(f"{masking} masking needs the mask teacher's hidden states")
    if masking == "direct":
        return direct_keep(hiddens[-1], n_keep)
    return progressive_keep(hiddens, drop_ratio, schedule)
