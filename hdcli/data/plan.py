"""Which samples each rank gets each epoch (map-style sources), and how many unreadable images an epoch tolerates."""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from hdcli.seeding import mix_seed

MIN_BAD_IMAGES = 5  # a small folder with one unreadable file still trains (0.1% of 40 images rounds to none)


def bad_image_budget(fraction: float, samples: int) -> int:
    """Unreadable images tolerated per epoch: ``fraction`` of the epoch's samples, at least MIN_BAD_IMAGES
    (none when ``fraction`` is 0: the user asked for no bad image at all)."""
    return 0 if fraction == 0 else max(MIN_BAD_IMAGES, math.floor(fraction * samples))


def steps_per_epoch(n: int, *, batch_size: int, world_size: int = 1, train: bool = True,
                    steps: int | None = None) -> int:
    """Batches per epoch per rank of a map-style source (see :func:`plan_batches`)."""
    g = batch_size * world_size
    if train:
        return steps or max(1, n // g)
    full = math.ceil(n / g)
    return min(steps, full) if steps else full


def plan_batches(n: int, *, batch_size: int, world_size: int = 1, rank: int = 0, epoch: int = 0,
                 seed: int = 0, train: bool = True, steps: int | None = None,
                 start: int = 0) -> Iterator[list[tuple[int, int]]]:
    """This rank's batches of one epoch over ``n`` samples: lists of (sample index, sample seed).

    Global batch i holds ``batch_size * world_size`` positions of the epoch order; rank r takes
    positions [r*batch_size, (r+1)*batch_size) of it. So the union over ranks of batch i is batch i
    of a single process with ``batch_size * world_size``, and each sample's seed depends only on
    (seed, epoch, position): augmentations do not change with the number of ranks or workers.

    train: order = a fresh permutation per (seed, epoch), repeated when more samples are needed;
    ``steps`` batches (default: n // global batch, at least 1; the tail is dropped).
    eval: order = 0..n-1 once; ceil(n / global batch) batches (``steps`` caps it); the last global
    batch may leave some ranks a short or empty slice.
    ``start`` skips that many batches without touching the data (mid-epoch resume).
    """
    g = batch_size * world_size
    steps = steps_per_epoch(n, batch_size=batch_size, world_size=world_size, train=train, steps=steps)
    if train:
        need = steps * g
        gen = torch.Generator().manual_seed(mix_seed(seed, epoch))
        reps = math.ceil(need / n)
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(reps)])[:need]  # [need]
    else:
        order = torch.arange(min(n, steps * g))  # [<= steps*g]
    for i in range(start, steps):
        lo = i * g + rank * batch_size
        pos = range(lo, min(lo + batch_size, len(order)))
        yield [(int(order[p]), mix_seed(seed, epoch, p)) for p in pos]
