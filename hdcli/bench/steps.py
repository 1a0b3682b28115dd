"""Timing real engine steps for ``hd bench distill``: the REAL :class:`~hdcli.tasks.distill.DistillTask` fed one
synthetic batch (or alternating with a real loader's), a clock read where the engine asks for each step's loss,
work run between two steps outside their timing, and the run stopped after the last timed step."""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hdcli.bench.parts import Parts
from hdcli.bench.timing import peak_memory_mb, sync
from hdcli.errors import HDError


class Stop(Exception):
    """Raised from the task at the start of the step after the last timed one: the engine stops there."""


class Batches:
    """The same host batch every step: compute is measured, not decoding (``hd bench data`` does that)."""

    def __init__(self, batch, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield self.batch


class Mixed:
    """Odd batches from the real loader, even ones the synthetic batch: step i's timing (which ends when batch
    i + 1 is in hand) includes fetching a real batch for even i, the synthetic one for odd i."""

    def __init__(self, real, batch, n: int):
        self.real, self.batch, self.n = real, batch, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        it = iter(self.real)
        for k in range(self.n):
            yield next(it) if k % 2 else self.batch

    def close(self) -> None:
        getattr(self.real, "close", lambda: None)()


@dataclass
class Clock:
    """ends[i]: the engine asks for step i's loss (step i-1 is over); starts[i]: step i starts (after any
    work done between the steps). Step i lasted ends[i+1] - starts[i]."""

    ends: list[float] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)

    def step(self, i: int) -> float:
        return self.ends[i + 1] - self.starts[i]


class Alternate(torch.nn.Module):
    """Two methods sharing one student (and the teachers); ``which`` picks the one a forward runs. The
    engine trains it like any method: its parameters are the student and both methods' heads."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b
        self.which = 0

    @property
    def student(self):
        return self.a.student

    @property
    def teachers(self):
        return self.a.teachers

    def forward(self, images, detail: bool = False):
        return (self.b if self.which else self.a)(images, detail=detail)


class OneOrAll(torch.nn.Module):
    """Several students (``method.students.Students``): ``which`` 0 runs them all from one teacher pass, k runs
    student k-1 alone with its own teacher pass (its single-student step)."""

    def __init__(self, students):
        super().__init__()
        self.students = students
        self.which = 0

    @property
    def members(self):
        return self.students.members

    @property
    def teachers(self):
        return self.students.teachers

    def forward(self, images, detail: bool = False):
        only = None if self.which == 0 else list(self.students.members)[self.which - 1]
        return self.students(images, detail=detail, only=only)


def bench_task(cfg, batch, clock: Clock, *, stop_at: int, sync_every: bool, sync_at: set[int],
                between: Callable[[object, int], None] | None = None, which: Callable[[int], int] | None = None,
                compare_drop_ratio: float | None = None, signals: bool = False, real_data: bool = False,
                cached_targets: bool = False, debug_from: int | None = None):
    """A DistillTask (the real one: same models, method and loss) fed by ``batch``. At the start of every
    step's loss it reads the clock, runs ``between(method, step)`` (outside the timed step) and reads the
    clock again; at call ``stop_at`` it raises Stop. With ``compare_drop_ratio`` the task's module
    alternates between its method and the same method at that drop ratio (``which(step)``: 0 or 1); with
    ``signals`` odd steps compute the per-target signals (as a logged step of a run does); with ``cached_targets``
    odd steps take the teacher pass's keep set and targets computed once for the batch (a target cache's step).
    ``debug_from``: from that step on, CUDA host syncs raise warnings (``torch.cuda.set_sync_debug_mode``)."""
    import copy

    from hdcli.method import hybrid
    from hdcli.tasks.distill import DistillTask

    class BenchTask(DistillTask):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.method, self.cached = self.model, None
            if self.members:  # several students: the parts and the FLOP model are one student's
                self.method = next(iter(self.model.members.values()))
                self.model = OneOrAll(self.model)
            if compare_drop_ratio is not None:
                dc = copy.deepcopy(cfg.distill)
                dc.drop_ratio = compare_drop_ratio
                other = hybrid.build(self.method.student, self.teacher_models, dc)
                self.model = Alternate(self.method, other)

        def train_loader(self, *, rank: int, world_size: int, seed: int):
            if real_data:
                return Mixed(super().train_loader(rank=rank, world_size=world_size, seed=seed), batch, cfg.train.steps)
            return Batches(batch, cfg.train.steps)

        def loss(self, model, b, *, detail=False):
            i = len(clock.ends)
            device = b[0].device
            if debug_from is not None and i == stop_at:
                torch.cuda.set_sync_debug_mode("default")  # before our own synchronisation
            if sync_every or i in sync_at:
                sync(device)
            clock.ends.append(time.perf_counter())
            if debug_from is not None and i == debug_from:
                torch.cuda.set_sync_debug_mode("warn")
            if i == stop_at:
                raise Stop
            if between is not None:
                between(self.method, i)
                sync(device)
            if which is not None:
                self.model.which = which(i)
            if signals:
                detail = i % 2 == 1
            if cached_targets and i % 2 == 1:
                if self.cached is None:  # the teacher pass once, outside the timed steps
                    from hdcli.data import normalize

                    tp, x = self.method.teacher_pass, normalize(b[0])
                    self.cached = tp.from_hidden(tp.hidden(x, tp.wanted()), x, normalise=False)
                    sync(device)
                clock.starts.append(time.perf_counter())
                from hdcli.data import normalize

                out = model(normalize(b[0]), detail=detail, cached=self.cached)
                return {"loss": out.loss, "loss_feat": out.loss_feat, "loss_rel": out.loss_rel}
            clock.starts.append(time.perf_counter())
            return super().loss(model, b, detail=detail)

        def export(self, model, out_dir) -> None:  # never reached: the run stops first
            pass

    holder: dict = {}

    def make():
        holder["task"] = BenchTask(cfg)
        return holder["task"]

    return make, holder


@dataclass
class Window:
    """Which engine steps are timed: ``first .. last-1``, every ``per``-th (with a comparison, steps alternate:
    even = this method, odd = the other); ``interleave``: parts run between the steps, timed one by one."""

    cuda: bool
    device: torch.device
    per: int
    first: int
    last: int
    interleave: bool
    extras: bool  # breakdown, reference or matmul requested

    @property
    def per_step(self) -> bool:
        """Steps timed one by one (medians), else the mean over the window synchronised at its ends."""
        return self.interleave or not self.cuda


def run_engine(b, cfg, batch, w: Window):
    """The engine on the bench task (``b``: the ``DistillBench`` settings), stopped after the last timed step. Returns (clock, task, parts or None,
    host-sync warnings, peak memory in MB)."""
    from hdcli.train import engine

    state: dict = {}

    def make_parts(method) -> Parts:
        return Parts(method, batch[0], cfg, dtype=b.dtype, breakdown=b.breakdown, reference=b.reference,
                     reference_reps=b.reference_reps, gemm_size=(b.gemm_size or 0) if b.gemm else None)

    def between(method, i: int) -> None:
        if i % w.per:
            return  # only before this method's own steps
        if i == w.first - w.per:
            state["parts"] = make_parts(method)
        if i >= w.first - w.per:
            state["parts"].once(record=i >= w.first)

    clock = Clock()
    debug = w.cuda and b.sync_debug
    make, holder = bench_task(cfg, batch, clock, stop_at=w.last, sync_every=w.per_step, sync_at={w.first, w.last},
                               between=between if w.interleave and w.extras else None,
                               which=(lambda i: i % 2) if b.compare_drop_ratio is not None else
                               (lambda i: i % w.per) if b.students > 1 else None,
                               compare_drop_ratio=b.compare_drop_ratio, signals=b.signals,
                               cached_targets=b.cached_targets,
                               real_data=b.data is not None,
                               debug_from=w.first if debug else None)
    if w.cuda:
        torch.cuda.reset_peak_memory_stats(w.device)
    with tempfile.TemporaryDirectory(prefix="hd-bench-") as run_dir, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always" if debug else "default")
        try:
            engine.train(make, cfg, run_dir)
        except Stop:
            pass
        finally:
            if debug:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [x for x in caught if "synchroniz" in str(x.message)]
    for x in caught:
        if x not in syncs:
            warnings.warn_explicit(x.message, x.category, x.filename, x.lineno)
    if len(clock.ends) <= w.last:
        raise HDError("the engine stopped before the benchmark's last step", "run with --debug to see why")
    peak_mem = peak_memory_mb(w.device)
    task = holder["task"]
    if w.extras and not w.interleave:
        parts = state["parts"] = make_parts(task.method)
        for i in range(min(b.warmup, 2) + b.steps):
            parts.once(record=i >= min(b.warmup, 2))
    return clock, task, state.get("parts"), syncs, peak_mem
