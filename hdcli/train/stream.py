"""Micro-batches as one stream over epochs, starting at any position (exact resume without replaying data)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator

from hdcli.errors import HDError
from hdcli.seeding import mix_seed, seed_all


class Stream:
    """Micro-batches as one stream over epochs, starting at any position; each epoch's iterator is
    opened under a seed of (seed, epoch) so the data seen at a position never depends on the past."""

    def __init__(self, loader: Iterable, per_epoch: int, start: int, seed: int):
        self.loader, self.per_epoch, self.seed = loader, per_epoch, seed
        self.epoch, self.index = divmod(start, per_epoch)
        self.it: Iterator | None = None

    def next(self):
        if self.it is None or self.index >= self.per_epoch:
            if self.it is not None:
                self.epoch, self.index = self.epoch + 1, 0
            self.it = self._open(self.epoch, self.index)
        try:
            batch = next(self.it)
        except StopIteration:
            raise HDError(f"the data loader ended after {self.index} batches in epoch {self.epoch}, but its len() "
                          f"promised {self.per_epoch}", "its len() must equal the batches it yields per epoch") from None
        self.index += 1
        return batch

    def _open(self, epoch: int, skip: int) -> Iterator:
        set_epoch = getattr(self.loader, "set_epoch", None)
        if callable(set_epoch):
            if skip and "start_batch" in inspect.signature(set_epoch).parameters:
                set_epoch(epoch, start_batch=skip)  # hdcli.data skips without decoding
                skip = 0
            else:
                set_epoch(epoch)
        seed_all(mix_seed(self.seed, 1, epoch))  # worker seeds / samplers that draw from the global RNG
        it = iter(self.loader)
        for _ in range(skip):  # resume mid-epoch: replay the order, skip the batches already trained on
            next(it)
        return it
