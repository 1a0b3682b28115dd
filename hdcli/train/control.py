"""What steers the loop from outside the step: SIGTERM/SIGINT, and the one-step-late guard that reads the
non-finite streak and stop requests, agreed by all ranks, without making the host wait for the device."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch

from hdcli.errors import HDError
from hdcli.train import checkpoints as ck


class Signals:
    """SIGTERM/SIGINT set a flag read at the next step boundary; a second SIGINT interrupts at once."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Guard:
    """The step's control values (non-finite streak, stop request), agreed by all ranks and read one step
    late so the host never waits for the device."""

    def __init__(self, r):
        self.r = r
        self.streak = torch.zeros((), device=r.device)
        self.skipped = torch.zeros((), device=r.device)
        self.no_signal = torch.zeros((), device=r.device)  # made once: a host->device copy per step would sync
        self.pending: torch.Tensor | None = None

    def after_step(self, bad: torch.Tensor, received: int | None, done: int) -> int | None:
        """Count this step; check the previous one's values (raise on too many non-finite steps); return the
        signal received, if any."""
        badf = bad.float()
        self.streak = (self.streak + 1) * badf
        self.skipped = self.skipped + badf
        sig = self.no_signal if not received else torch.full((), float(received), device=self.r.device)
        ctrl = torch.stack([self.streak, sig])
        if self.r.world > 1:
            torch.distributed.all_reduce(ctrl, op=torch.distributed.ReduceOp.MAX)
        stopped = check(self.pending, self.r, done - 1) if self.pending is not None else None
        self.pending = ctrl
        if done == self.r.n_steps:  # the last step: nothing comes after it to carry the check
            check(self.pending, self.r, done)
            stopped = None  # a stop request at the very end: just finish (export included)
        return stopped


def check(ctrl: torch.Tensor, r, step: int) -> int | None:
    """Read a step's control values (one host sync): HDError on too many non-finite steps; the signal, if any."""
    streak, sig = ctrl.tolist()
    if streak > r.cfg.train.nan_tolerance:
        good = ck.list_checkpoints(r.run_dir)
        raise HDError(f"the loss was not finite for {int(streak)} consecutive steps (up to step {step}); "
                      f"the run stopped" + (f", last good checkpoint {good[-1]}" if good else ""),
                      "lower the learning rate, use bf16 rather than fp16, check the data, or raise --nan-tolerance")
    return int(sig) or None
