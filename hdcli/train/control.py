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
    """The step's control values (non-finite streaks, stop request), agreed by all ranks and read one step
    late so the host never waits for the device. More than ``nan_tolerance`` non-finite steps in a row of a
    member (``names``: one per independently optimised part, "" for a single model) stop the run with an error
    naming it and the last good checkpoint in ``run_dir``."""

    def __init__(self, device: torch.device, world: int, n_steps: int, nan_tolerance: int, run_dir,
                 names: list[str] = ("",)):
        self.device, self.world, self.n_steps = device, world, n_steps
        self.nan_tolerance, self.run_dir, self.names = nan_tolerance, run_dir, list(names)
        self.streak = torch.zeros(len(self.names), device=device)
        self.skipped = torch.zeros(len(self.names), device=device)
        self.no_signal = torch.zeros(1, device=device)  # made once: a host->device copy per step would sync
        self.pending: torch.Tensor | None = None

    def after_step(self, bad: torch.Tensor, received: int | None, done: int) -> int | None:
        """Count this step (``bad``: [members] bools); check the previous one's values (raise on too many
        non-finite steps); return the signal received, if any."""
        badf = bad.float().reshape(-1)
        self.streak = (self.streak + 1) * badf
        self.skipped = self.skipped + badf
        sig = self.no_signal if not received else torch.full((1,), float(received), device=self.device)
        ctrl = torch.cat([self.streak, sig])
        if self.world > 1:
            torch.distributed.all_reduce(ctrl, op=torch.distributed.ReduceOp.MAX)
        stopped = self.check(self.pending, done - 1) if self.pending is not None else None
        self.pending = ctrl
        if done == self.n_steps:  # the last step: nothing comes after it to carry the check
            self.check(self.pending, done)
            stopped = None  # a stop request at the very end: just finish (export included)
        return stopped

    def check(self, ctrl: torch.Tensor, step: int) -> int | None:
        """Read a step's control values (one host sync): HDError on too many non-finite steps; the signal, if any."""
        *streaks, sig = ctrl.tolist()
        worst = max(range(len(streaks)), key=lambda i: streaks[i])
        if streaks[worst] > self.nan_tolerance:
            good = ck.list_checkpoints(self.run_dir)
            who = f" of student {self.names[worst]!r}" if self.names[worst] else ""
            raise HDError(f"the loss{who} was not finite for {int(streaks[worst])} consecutive steps (up to step {step}); "
                          f"the run stopped" + (f", last good checkpoint {good[-1]}" if good else ""),
                          "lower the learning rate, use bf16 rather than fp16, check the data, or raise --nan-tolerance")
        return int(sig) or None
