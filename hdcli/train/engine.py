"""The one training loop of ``hd``: distill, finetune and pretrain plug a ``Task`` into ``train``.

A plain PyTorch loop (as in Accelerate's examples); Accelerate only places models, wraps the trainable one in DDP,
applies mixed precision / ``torch.compile``, and saves/loads state. The run's set-up (lock, resume, config
history, Accelerate, plan, optimiser) is :mod:`~hdcli.train.setup`; beside them :mod:`~hdcli.train.optim` (AdamW
groups, lr schedule), :mod:`~hdcli.train.checkpoints` (checkpoint and run-dir I/O), :mod:`~hdcli.train.log`
(records, bar), :mod:`~hdcli.train.control` (signals, the non-finite guard), :mod:`~hdcli.train.stream` (data).

- AdamW (fused where the device has it), lr = blr × global batch / 256, per-step cosine with linear warm-up
  computed from the step alone (no scheduler state), per-group ``lr_scale`` (layer decay); grad clipping;
  gradient accumulation.
- Exact resume: the randomness of step s on rank r is seeded from (seed, r, s), each epoch's data iterator from
  (seed, epoch), and the data position is a pure function of the step, so a run resumed from a checkpoint
  continues exactly as if it had never stopped.
- Non-finite steps are skipped on the device (fused AdamW's ``found_inf``) and counted; more than
  ``nan_tolerance`` in a row stops the run with an error. SIGTERM/SIGINT save a checkpoint at the next step
  boundary. Both are checked one step late so the loop never waits for the device.

Do not pass a WebDataset loader through ``accelerator.prepare`` (it would dispatch from rank 0 and drop data):
the task builds a per-rank loader and the engine moves batches to the device itself.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from hdcli import ui
from hdcli.errors import HDError
from hdcli.rundir import CHECKPOINTS, RunLock
from hdcli.seeding import mix_seed, seed_all
from hdcli.train import checkpoints as ck
from hdcli.train import setup
from hdcli.train.control import Guard, Signals
from hdcli.train.log import Log, fmt_time, say
from hdcli.train.optim import lr_at, set_lr
from hdcli.train.setup import Optim, Run, make_accelerator, resolve_mixed_precision
from hdcli.train.stream import Stream
from hdcli.train.task import Task

__all__ = ["Task", "train", "to_device", "make_accelerator", "resolve_mixed_precision"]


def train(make_task: Callable[[], Task], cfg, run_dir: str | os.PathLike, *, resume: str | None = None,
          resume_hint: str | None = None, allow_config_change: bool = False) -> dict:
    """Train ``make_task()`` with ``cfg.train``/``cfg.optim`` into ``run_dir``; return a summary dict.

    ``make_task`` is called first, right after seeding (every rank builds the same initial weights; a bad name
    or path fails before any distributed set-up); it builds its models on the CPU. ``resume``: None (refuse a run
    dir that already holds checkpoints), ``"auto"`` (newest complete checkpoint of ``run_dir``, or a fresh
    start) or a checkpoint/run path. ``resume_hint``: the command that resumes this run, printed after
    SIGTERM/SIGINT. A resume that changes what defines the method or the model (the config class's ``IDENTITY``)
    is refused unless ``allow_config_change``; then the previous segment's config is kept in
    ``<run>/config-history/`` and the change is recorded in metrics.jsonl.
    """
    locks: list[RunLock] = []
    held: list[Any] = []  # the task and its loader, closed however the run ends
    try:
        run_dir = Path(run_dir).resolve()
        if run_dir.is_dir():  # a live run's dir: refuse before reading its checkpoints or building any model
            setup.lock(run_dir, locks)
        ckpt = ck.find_checkpoint(resume, run_dir)
        if ckpt is not None:  # a damaged newest checkpoint falls back to the one before (--resume auto)
            ckpt = ck.intact(ckpt, run_dir, newest=str(resume) == "auto")
        if resume is None and ck.list_checkpoints(run_dir):
            raise HDError(f"{run_dir} already holds checkpoints of a run",
                          "add --resume auto to continue it, or choose another --out")
        changes = setup.config_changes(cfg, run_dir, allow_config_change) if ckpt is not None else {}
        r = setup.prepare(make_task, cfg, run_dir, locks, held)
        start = setup.restore(r, ckpt, changes) if ckpt is not None else 0
        if ckpt is None and resume == "auto" and r.main:
            say(f"no checkpoint in {escape(str(run_dir / CHECKPOINTS))}: starting from scratch")
        setup.open_run_dir(r, start, changes)
        # signals are caught until the export is written: a stop request during it waits for it to finish
        with Signals() as signals:
            try:
                stopped, last_saved, log = _loop(r, start, signals, resumed=ckpt is not None)
                return _finish(r, stopped, last_saved, log, resume_hint, signals)
            except KeyboardInterrupt:  # a second Ctrl-C: out at once, but say what is on disk
                if ui.is_main_process():
                    _say_interrupted(run_dir, resume_hint)
                raise
    finally:
        for thing in reversed(held):
            close = getattr(thing, "close", None)
            if close is not None:
                close()
        for lock in locks:
            lock.release()
        setup.reset_accelerate()


def _loop(r: Run, start: int, signals: Signals, *, resumed: bool) -> tuple[int | None, int | None, Log]:
    """Optimiser steps ``start .. n_steps-1``; returns (stop signal or None, last saved step, the log)."""
    tc, plan, task, acc = r.cfg.train, r.plan, r.task, r.accelerator
    stream = Stream(r.loader, plan.per_epoch, start * plan.accum, tc.seed)
    guard = Guard(acc.device, r.world, plan.n_steps, tc.nan_tolerance, r.run_dir, [o.name for o in r.optims])
    last_saved, stopped = (start if resumed else None), None
    log = Log(name=type(task).__name__.removesuffix("Task").lower() or "train", keys=task.log_keys, run_dir=r.run_dir,
              n_steps=plan.n_steps, start=start, global_batch=plan.global_batch, main=r.main, accelerator=acc,
              trackers=bool(tc.all_trackers), members=[(o.name, o.dir) for o in r.optims])
    model = acc.unwrap_model(r.models.wrapped)
    r.models.train()
    with log:
        first = _timed(task.begin, model, acc, start)
        if first:
            log.write({"step": start, "epoch": plan.epoch(start), **first})
            log.restart_window()
            r.models.train()
        for step in range(start, plan.n_steps):
            lrs = [lr_at(step, total=plan.n_steps, warmup=plan.warmup, peak=o.peak, min_lr=o.min_lr) for o in r.optims]
            for o, lr in zip(r.optims, lrs, strict=True):
                set_lr(o.raw, lr)
            done = step + 1
            logged = done % tc.log_every == 0 or done == plan.n_steps
            loss = _forward_backward(r, stream, step, log, detail=logged)
            grad_norms, bad = zip(*(_optimizer_step(o, r.accelerator, loss) for o in r.optims), strict=True)
            stopped = guard.after_step(torch.stack(bad), signals.received, done)
            log.step_done()
            # also when stopping: a resumed run starts after this step and would never evaluate it
            evaluate = task.eval_at(done, n_steps=plan.n_steps,
                                    epoch_end=plan.epochs_done(done) > plan.epochs_done(done - 1))
            if logged or stopped or evaluate:
                rec = log.record(done=done, epoch=plan.epoch(done), lrs=lrs, grad_norms=grad_norms,
                                 skipped=guard.skipped, bad_images=_bad_images(r), world=r.world)
                rec["bad_images"] += r.bad_before
                if evaluate:
                    rec.update(_timed(task.evaluate, model, acc, plan.epochs_done(done) - 1, done) or {})
                    log.restart_window()  # the next window's images/s leaves the evaluation out
                    r.models.train()
                log.write(rec)
            if done == plan.n_steps:
                _check_finite(r)  # before the last save: a non-finite model is neither saved last nor exported
            if stopped or done % tc.save_every == 0 or done == plan.n_steps:
                _save(r, done)
                last_saved = done
            if stopped:
                break
    return stopped, last_saved, log


def _timed(fn, *args) -> dict | None:
    """``fn(*args)``'s numbers with its wall time added as ``eval_s`` (None stays None)."""
    t = time.perf_counter()
    out = fn(*args)
    return {**out, "eval_s": time.perf_counter() - t} if out else out


def _forward_backward(r: Run, stream: Stream, step: int, log: Log, *, detail: bool) -> torch.Tensor:
    """The step's ``accum`` micro-batches: loss, backward (DDP syncs on the last one); returns the last loss.
    ``detail``: the step is logged (the task may add costlier entries, e.g. per-target signals)."""
    accum, acc, wrapped = r.plan.accum, r.accelerator, r.models.wrapped
    for micro in range(accum):
        batch = stream.next()
        seed_all(mix_seed(r.cfg.train.seed, 2, acc.process_index, step, micro))  # drop path, masking, ...
        batch = to_device(batch, acc.device)
        with nullcontext() if micro == accum - 1 else acc.no_sync(wrapped):
            out = r.task.loss(wrapped, batch, detail=detail)
            if "loss" not in out:
                raise HDError(f"{type(r.task).__name__}.loss() returned no 'loss' entry")
            acc.backward(out["loss"] / accum)
        log.add(out, accum)
    return out["loss"]


def _optimizer_step(optim: Optim, accelerator, loss: torch.Tensor):
    """Clip, then AdamW, of one member; a non-finite step is skipped on the device. Returns (grad norm, bad)
    device scalars."""
    grad_norm = accelerator.clip_grad_norm_(optim.params, optim.clip if optim.clip else float("inf"))
    bad = ~torch.isfinite(loss.detach()) if optim.fp16 else ~torch.isfinite(grad_norm)
    if not optim.fp16:  # fp16: the GradScaler skips overflowing steps itself
        optim.raw.found_inf = bad.float()  # fused AdamW skips the update on the device
    optim.wrapped.step()
    optim.wrapped.zero_grad(set_to_none=True)
    return grad_norm, bad


def _finish(r: Run, stopped: int | None, last_saved: int | None, log: Log, resume_hint: str | None,
            signals: Signals) -> dict:
    """After the loop: a stopped run says where its checkpoint is; a finished one is exported (a signal that
    arrives meanwhile waits for the export and is reported with it)."""
    n = r.plan.n_steps
    result = {"run_dir": str(r.run_dir), "steps": last_saved if stopped else n, "total_steps": n,
              "first_loss": log.first_loss, "last_loss": log.last_loss, "time_s": time.perf_counter() - log.t_start,
              "interrupted": signal.Signals(stopped).name if stopped else None, "student": None}
    if stopped:
        if r.main:
            hint = resume_hint or f"--out {r.run_dir} --resume auto"
            where = escape(str(r.run_dir / CHECKPOINTS / ck.checkpoint_name(last_saved)))
            say(f"[yellow]warning:[/] {signal.Signals(stopped).name} received: stopped at step {last_saved}/{n}, "
                f"checkpoint saved in {where}. Resume with: {escape(hint)}")
        r.accelerator.wait_for_everyone()
    else:
        if last_saved != n:  # the loop saves its last step; this only covers an empty loop
            _save(r, n)
        result["student"] = _export(r)
        if r.main:
            loss_txt = f"; loss {log.first_loss:.4f} → {log.last_loss:.4f}" if log.first_loss is not None else ""
            say(f"done: {n} steps in {fmt_time(result['time_s'])}{loss_txt}; "
                f"{r.task.export_dir} in {escape(result['student'])}")
        if signals.received:  # it came while the last steps were saved and exported: all of it is on disk
            result["interrupted"] = signal.Signals(signals.received).name
            if r.main:
                say(f"[yellow]warning:[/] {result['interrupted']} received while finishing: the run is complete "
                    f"(last checkpoint and {escape(result['student'])} written) before stopping")
    if r.cfg.train.all_trackers:
        r.accelerator.end_training()
    if r.main and r.cfg.train.plot:
        for where in dict.fromkeys(o.dir for o in r.optims):
            _plot(r.run_dir / where)
    return result


def _export(r: Run) -> str:
    """The task's export into ``<run>/<export_dir>``, or each member's into ``<run>/<member dir>/<export_dir>``
    (atomic each); the path, or the members' paths joined by ", "."""
    model, task = r.accelerator.unwrap_model(r.models.wrapped), r.task
    if not task.members:
        return str(ck.export(lambda out: task.export(model, out), r.accelerator, r.run_dir / task.export_dir))
    return ", ".join(str(ck.export(lambda out, name=m.name: task.export_member(model, name, out), r.accelerator,
                                   r.run_dir / m.dir / task.export_dir)) for m in task.members)


def _say_interrupted(run_dir: Path, resume_hint: str | None) -> None:
    good = ck.list_checkpoints(run_dir)
    where = f"the newest complete checkpoint is {escape(str(good[-1]))}" if good else "no checkpoint was saved yet"
    hint = f"; resume with: {escape(resume_hint)}" if good and resume_hint else ""
    say(f"[yellow]warning:[/] interrupted at once (a second Ctrl-C): this step was not saved; {where}{hint}")


def _check_finite(r: Run) -> None:
    """HDError before the export when a trained weight holds NaN or inf: such a model is never written."""
    bad = [n for n, p in r.models.model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise HDError(f"the final weights are not finite ({len(bad)} tensor(s), e.g. {bad[0]}): "
                      f"{r.task.export_dir}/ was not written", "lower the learning rate, use bf16 rather than fp16, "
                      "or resume from an earlier checkpoint with --resume PATH")


def _save(r: Run, step: int) -> Path:
    plan, acc = r.plan, r.accelerator
    bad = torch.tensor(float(_bad_images(r)), device=acc.device)
    bad = int(acc.reduce(bad, "sum").item()) if r.world > 1 else int(bad.item())
    return ck.save_checkpoint(acc, r.run_dir, step, {
        "step": step, "total_steps": plan.n_steps, "epoch": plan.epochs_done(step), "batches_per_epoch": plan.per_epoch,
        "global_batch": plan.global_batch, "world_size": r.world,
        "bad_images": r.bad_before + bad,  # over the whole run, earlier segments included
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, r.cfg.train.keep_checkpoints)


def _bad_images(r: Run) -> int:
    """Unreadable images this segment's loader skipped on this rank."""
    return int(getattr(r.loader, "bad_samples", 0) or 0)


def to_device(batch, device: torch.device):
    """Tensors of a (nested) batch to ``device``; on CUDA through pinned memory so the copy is asynchronous.
    An ``EncodedBatch`` (the gpu decode path) is decoded on ``device``."""
    from hdcli.data.decode import EncodedBatch

    if isinstance(batch, EncodedBatch):
        return batch.to(device)
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda" and batch.device.type == "cpu" and not batch.is_pinned():
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def _plot(run_dir: Path) -> None:
    """<run>/plots/*.png at the end of a run; a failure to plot is a warning, never a lost run."""
    from hdcli.train import plots as plot

    try:
        written = plot.plot_runs([run_dir])
    except Exception as e:  # noqa: BLE001 - the run is on disk; the plots are a convenience
        ui.warn(f"could not write the plots of {escape(str(run_dir))}: {e} (hd plot {escape(str(run_dir))} retries)")
        return
    if written:
        say(f"plots: {escape(str(written[0].parent))} ({len(written)} PNGs; hd plot compares runs)")
