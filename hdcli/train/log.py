"""What the loop says while it runs: loss sums per window, the metrics record, the progress bar or plain lines.

A record (one line of ``<run>/metrics.jsonl``) holds the step, epoch, lr, every entry of the task's loss dict
averaged over the steps of the window that gave it (entries computed on logged steps only, such as the
per-target signals, are that step's value), the gradient norm, the skipped-step and bad-image counts,
images/s, the elapsed time, and the task's evaluation when it ran (with ``eval_s``, its wall time). Reading
the sums is the loop's only host sync, so it happens every ``log_every`` steps only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from hdcli import ui
from hdcli.train.checkpoints import append_metrics

# record entries that are not the task's loss parts (shown specially, or not at all, in log lines)
_FIXED = ("step", "epoch", "lr", "img_per_s", "time_s", "grad_norm", "skipped_steps", "bad_images", "eval_s")


def say(msg: str) -> None:
    """A message that stays on one line in cluster logs (paths are copied from there)."""
    ui.console.print(msg, soft_wrap=True)


def fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Log:
    """Loss sums of the current window, turned into a record every ``log_every`` steps and shown.

    ``add(out, accum)`` after each micro-batch (device tensors, no sync); ``record(...)`` reduces over ranks
    and starts a new window; ``write(rec)`` appends it to metrics.jsonl and shows it (main process only).
    Used as a context manager, it holds the progress bar (main process, interactive terminals).
    """

    def __init__(self, *, name: str, keys: Sequence[str], run_dir, n_steps: int, start: int, global_batch: int,
                 main: bool, accelerator, trackers: bool, members: Sequence[tuple[str, str]] = (("", ""),)):
        self.keys, self.run_dir, self.n_steps, self.start = tuple(keys), run_dir, n_steps, start
        self.members = [(n, d) for n, d in members if n]  # (name, dir) of each independently optimised part
        self.global_batch, self.main, self.accelerator, self.trackers = global_batch, main, accelerator, trackers
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}
        self.shown: dict[str, float] = {}  # the latest value of each of ``keys``  # steps (fractions per micro-batch) each entry of the window was added
        self.window = 0
        self.t_start = self.t_window = time.perf_counter()
        self.first_loss = self.last_loss = None
        self.bar = ui.progress() if main else None
        self.bar_task = None
        self._name = name

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
            self.bar_task = self.bar.add_task(self._name, total=self.n_steps, completed=self.start, info="")
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def add(self, out: dict[str, torch.Tensor], accum: int) -> None:
        for k, v in out.items():
            v = v.detach().float() / accum
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0.0) + 1.0 / accum

    def restart_window(self) -> None:
        """Time the window's images/s from now (after an evaluation)."""
        self.t_window = time.perf_counter()

    def step_done(self) -> None:
        self.window += 1
        if self.bar is not None:
            self.bar.update(self.bar_task, advance=1)

    def record(self, *, done: int, epoch: float, lrs: Sequence[float], grad_norms: Sequence[torch.Tensor],
               skipped: torch.Tensor, bad_images: int, world: int) -> dict:
        """The window's record, averaged over ranks (one host sync); a new window starts. ``lrs``, ``grad_norms``
        and ``skipped`` ([members]) are per member: ``lr``, ``grad_norm``, ``skipped_steps`` for a single model,
        ``<member>/lr``, ... for several."""
        keys = list(self.sums)
        m = len(lrs)
        device = skipped.device
        bad = torch.tensor([float(bad_images)], device=device)
        vals = torch.cat([torch.stack([self.sums[k] for k in keys]) if keys else bad[:0], bad * world,
                          skipped.reshape(-1).float(), torch.stack([g.detach().float() for g in grad_norms])])
        vals = (self.accelerator.reduce(vals, "mean") if world > 1 else vals).tolist()
        dt = time.perf_counter() - self.t_window
        own = {}
        prefixes = [f"{n}/" for n, _ in self.members] or [""]
        for i, prefix in enumerate(prefixes):
            own.update({f"{prefix}lr": lrs[i], f"{prefix}grad_norm": vals[-m + i],
                        f"{prefix}skipped_steps": int(round(vals[-2 * m + i]))})
        rec = {"step": done, "epoch": epoch, **({"lr": lrs[0]} if not self.members else {}),
               **{k: v / self.counts[k] for k, v in zip(keys, vals, strict=False)}, **own,
               "bad_images": int(round(vals[-2 * m - 1])),
               "img_per_s": self.global_batch * self.window / max(dt, 1e-9), "time_s": time.perf_counter() - self.t_start}
        self._loss_keys = set(keys)
        self.sums, self.counts, self.window, self.t_window = {}, {}, 0, time.perf_counter()
        self.first_loss = rec["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = rec["loss"]
        return rec

    def split(self, rec: dict, name: str) -> dict:
        """Member ``name``'s record of a run's record: its own ``<name>/...`` entries unprefixed, the shared ones
        (every entry not of a member) as they are: what its own single run would record."""
        own = {k[len(name) + 1:]: v for k, v in rec.items() if k.startswith(f"{name}/")}
        others = tuple(f"{n}/" for n, _ in self.members)
        return {**{k: v for k, v in rec.items() if not k.startswith(others)}, **own}

    def write(self, rec: dict) -> None:
        """Append ``rec`` to metrics.jsonl (and each member's record to its own), show it, and send it to the
        tracker (main process only)."""
        if not self.main:
            return
        append_metrics(self.run_dir, rec)
        for name, where in self.members:
            append_metrics(self.run_dir / where, self.split(rec, name))
        if self.trackers:
            self.accelerator.log({k: v for k, v in rec.items() if isinstance(v, int | float)}, step=rec["step"])
        if "img_per_s" not in rec:  # a record of the task's own numbers (``Task.begin``): one line
            ui.console.print(f"step {rec['step']}: " + " ".join(f"{k} {v:.4g}" for k, v in rec.items()
                                                               if k not in _FIXED and isinstance(v, int | float)),
                             soft_wrap=True, markup=False)
            return
        self.shown.update({k: rec[k] for k in self.keys if k in rec})  # an evaluation stays shown until the next
        shown = " ".join(f"{k} {self.shown[k]:.4f}" for k in self.keys if k in self.shown)
        lr = rec.get("lr", next((v for k, v in rec.items() if k.endswith("/lr")), 0.0))
        info = f"{shown} lr {lr:.2e} {rec['img_per_s']:.0f} img/s"
        if rec.get("skipped_steps"):
            info += f" skipped {rec['skipped_steps']}"
        if rec.get("bad_images"):
            info += f" bad images {rec['bad_images']}"
        if self.bar is not None and not self.bar.disable:
            self.bar.update(self.bar_task, info=info)
            return
        members = tuple(f"{n}/" for n, _ in self.members)  # a member's own entries: in its own records
        extra = " ".join(f"{k} {v:.4g}" for k, v in rec.items()
                         if k not in self._loss_keys and k not in self.keys and k not in _FIXED
                         and not (members and k.startswith(members)) and isinstance(v, int | float))
        eta = rec["time_s"] / (rec["step"] - self.start) * (self.n_steps - rec["step"])
        line = f"step {rec['step']}/{self.n_steps} ep {rec['epoch']:.2f} {info}" + (f" {extra}" if extra else "")
        ui.console.print(line + f" eta {fmt_time(eta)}", soft_wrap=True, markup=False)  # one line per record
