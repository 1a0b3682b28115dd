"""The one training loop of ``hd``: distill, finetune and pretrain plug a ``Task`` into ``train``.

A plain PyTorch loop (as in Accelerate's examples); Accelerate only places models, wraps the trainable
one in DDP, applies mixed precision / ``torch.compile``, and saves/loads state. This module holds the
loop and its set-up; beside it, :mod:`~hdcli.train.optim` (AdamW groups, lr schedule),
:mod:`~hdcli.train.checkpoints` (checkpoint and run-dir I/O) and :mod:`~hdcli.train.log` (records, bar).

- AdamW (fused where the device has it), lr = blr × global batch / 256, per-step cosine with linear
  warm-up computed from the step alone (no scheduler state), per-group ``lr_scale`` (layer decay);
  grad clipping; gradient accumulation.
- Exact resume: the randomness of step s on rank r is seeded from (seed, r, s), each epoch's data
  iterator from (seed, epoch), and the data position is a pure function of the step, so a run
  resumed from a checkpoint continues exactly as if it had never stopped.
- Non-finite steps are skipped on the device (fused AdamW's ``found_inf``) and counted; more than
  ``nan_tolerance`` in a row stops the run with an error. SIGTERM/SIGINT save a checkpoint at the
  next step boundary. Both are checked one step late so the loop never waits for the device.

Do not pass a WebDataset loader through ``accelerator.prepare`` (it would dispatch from rank 0 and
drop data): the task builds a per-rank loader and the engine moves batches to the device itself.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape
from torch import nn

from hdcli import ui
from hdcli.config import save_config
from hdcli.errors import HDError
from hdcli.rundir import CHECKPOINTS, CONFIG, CONFIG_HISTORY, TENSORBOARD, RunLock, atomic_write
from hdcli.seeding import mix_seed, seed_all
from hdcli.train import checkpoints as ck
from hdcli.train.control import Guard, Signals
from hdcli.train.log import Log, fmt_time, say
from hdcli.train.optim import build_adamw, lr_at, scaled_lr, set_lr, total_steps
from hdcli.train.stream import Stream
from hdcli.train.task import Task

__all__ = ["Task", "train", "to_device", "make_accelerator", "resolve_mixed_precision"]


# ---------------------------------------------------------------- the loop

def train(make_task: Callable[[], Task], cfg, run_dir: str | os.PathLike, *, resume: str | None = None,
          resume_hint: str | None = None, allow_config_change: bool = False) -> dict:
    """Train ``make_task()`` with ``cfg.train``/``cfg.optim`` into ``run_dir``; return a summary dict.

    ``make_task`` is called first, right after seeding (every rank builds the same initial weights;
    a bad name or path fails before any distributed set-up); it builds its models on the CPU.
    ``resume``: None (refuse a run dir that already holds checkpoints), ``"auto"`` (newest complete
    checkpoint of ``run_dir``, or a fresh start) or a checkpoint/run path.
    ``resume_hint``: the command that resumes this run, printed after SIGTERM/SIGINT.
    A resume that changes what defines the method or the model (the config class's ``IDENTITY``) is
    refused unless ``allow_config_change``; then the previous segment's config is kept in
    ``<run>/config-history/`` and the change is recorded in metrics.jsonl.
    """
    locks: list[RunLock] = []
    held: list[Any] = []  # the task and its loader, closed however the run ends
    try:
        run_dir = Path(run_dir).resolve()
        if run_dir.is_dir():  # a live run's dir: refuse before reading its checkpoints or building any model
            _lock(run_dir, locks)
        ckpt = ck.find_checkpoint(resume, run_dir)
        if ckpt is not None:  # a damaged newest checkpoint falls back to the one before (--resume auto)
            ckpt = ck.intact(ckpt, run_dir, newest=str(resume) == "auto")
        if resume is None and ck.list_checkpoints(run_dir):
            raise HDError(f"{run_dir} already holds checkpoints of a run",
                          "add --resume auto to continue it, or choose another --out")
        changes = _config_changes(cfg, run_dir, allow_config_change) if ckpt is not None else {}
        r = _setup(make_task, cfg, run_dir, locks, held)
        start = _restore(r, ckpt) if ckpt is not None else 0
        if ckpt is None and resume == "auto" and r.main:
            say(f"no checkpoint in {escape(str(run_dir / CHECKPOINTS))}: starting from scratch")
        _open_run_dir(r, start, changes)
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
        _reset_accelerate()


def _loop(r: _Run, start: int, signals: Signals, *, resumed: bool) -> tuple[int | None, int | None, Log]:
    """Optimiser steps ``start .. n_steps-1``; returns (stop signal or None, last saved step, the log)."""
    tc, oc = r.cfg.train, r.cfg.optim
    stream = Stream(r.loader, r.per_epoch, start * r.accum, tc.seed)
    guard = Guard(r)
    last_saved, stopped = (start if resumed else None), None
    log = Log(name=type(r.task).__name__.removesuffix("Task").lower() or "train", keys=r.task.log_keys,
              run_dir=r.run_dir, n_steps=r.n_steps, start=start, global_batch=r.global_batch, main=r.main,
              accelerator=r.accelerator, trackers=bool(tc.all_trackers))
    _train_mode(r)
    with log:
        first = _timed(r.task.begin, r.accelerator.unwrap_model(r.wrapped), r.accelerator, start)
        if first:
            log.write({"step": start, "epoch": round(r.accum * start / r.per_epoch, 4), **first})
            log.restart_window()
            _train_mode(r)
        for step in range(start, r.n_steps):
            lr = lr_at(step, total=r.n_steps, warmup=r.warmup, peak=r.peak, min_lr=oc.min_lr)
            set_lr(r.raw_opt, lr)
            done = step + 1
            logged = done % tc.log_every == 0 or done == r.n_steps
            r.task.detail = logged
            loss = _forward_backward(r, stream, step, log)
            grad_norm, bad = _optimizer_step(r, loss)
            stopped = guard.after_step(bad, signals.received, done)
            log.step_done()
            epochs_done = r.accum * done // r.per_epoch
            # also when stopping: a resumed run starts after this step and would never evaluate it
            evaluate = r.task.eval_at(done, n_steps=r.n_steps,
                                      epoch_end=epochs_done > r.accum * (done - 1) // r.per_epoch)
            if logged or stopped or evaluate:
                rec = log.record(done=done, epoch=round(r.accum * done / r.per_epoch, 4), lr=lr, grad_norm=grad_norm,
                                 skipped=guard.skipped, bad_images=_bad_images(r), world=r.world)
                rec["bad_images"] += r.bad_before
                if evaluate:
                    rec.update(_timed(r.task.evaluate, r.accelerator.unwrap_model(r.wrapped), r.accelerator,
                                      epochs_done - 1, done) or {})
                    log.restart_window()  # the next window's images/s leaves the evaluation out
                    _train_mode(r)
                log.write(rec)
            if done == r.n_steps:
                _check_finite(r)  # before the last save: a non-finite model is neither saved last nor exported
            if stopped or done % tc.save_every == 0 or done == r.n_steps:
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


def _forward_backward(r: _Run, stream: Stream, step: int, log: Log) -> torch.Tensor:
    """The step's ``accum`` micro-batches: loss, backward (DDP syncs on the last one); returns the last loss."""
    for micro in range(r.accum):
        batch = stream.next()
        seed_all(mix_seed(r.cfg.train.seed, 2, r.rank, step, micro))  # model-side randomness (drop path, ...)
        batch = to_device(batch, r.device)
        sync = micro == r.accum - 1
        with nullcontext() if sync else r.accelerator.no_sync(r.wrapped):
            out = r.task.loss(r.wrapped, batch)
            if "loss" not in out:
                raise HDError(f"{type(r.task).__name__}.loss() returned no 'loss' entry")
            r.accelerator.backward(out["loss"] / r.accum)
        log.add(out, r.accum)
    return out["loss"]


def _optimizer_step(r: _Run, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip, then AdamW; a non-finite step is skipped on the device. Returns (grad norm, bad) device scalars."""
    clip = r.cfg.optim.clip_grad
    grad_norm = r.accelerator.clip_grad_norm_(r.params, clip if clip else float("inf"))
    bad = ~torch.isfinite(loss.detach()) if r.fp16 else ~torch.isfinite(grad_norm)
    if not r.fp16:  # fp16: the GradScaler skips overflowing steps itself
        r.raw_opt.found_inf = bad.float()  # fused AdamW skips the update on the device
    r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)
    return grad_norm, bad


def _finish(r: _Run, stopped: int | None, last_saved: int | None, log: Log, resume_hint: str | None,
            signals: Signals) -> dict:
    """After the loop: a stopped run says where its checkpoint is; a finished one is exported (a signal that
    arrives meanwhile waits for the export and is reported with it)."""
    result = {"run_dir": str(r.run_dir), "steps": last_saved if stopped else r.n_steps, "total_steps": r.n_steps,
              "first_loss": log.first_loss, "last_loss": log.last_loss, "time_s": time.perf_counter() - log.t_start,
              "interrupted": signal.Signals(stopped).name if stopped else None, "student": None}
    if stopped:
        if r.main:
            hint = resume_hint or f"--out {r.run_dir} --resume auto"
            where = escape(str(r.run_dir / CHECKPOINTS / ck.checkpoint_name(last_saved)))
            say(f"[yellow]warning:[/] {signal.Signals(stopped).name} received: stopped at step {last_saved}/"
                f"{r.n_steps}, checkpoint saved in {where}. Resume with: {escape(hint)}")
        r.accelerator.wait_for_everyone()
    else:
        if last_saved != r.n_steps:  # the loop saves its last step; this only covers an empty loop
            _save(r, r.n_steps)
        result["student"] = str(ck.export(r.task, r.accelerator, r.accelerator.unwrap_model(r.wrapped), r.run_dir))
        if r.main:
            loss_txt = f"; loss {log.first_loss:.4f} → {log.last_loss:.4f}" if log.first_loss is not None else ""
            say(f"done: {r.n_steps} steps in {fmt_time(result['time_s'])}{loss_txt}; "
                f"{r.task.export_dir} in {escape(result['student'])}")
        if signals.received:  # it came while the last steps were saved and exported: all of it is on disk
            result["interrupted"] = signal.Signals(signals.received).name
            if r.main:
                say(f"[yellow]warning:[/] {result['interrupted']} received while finishing: the run is complete "
                    f"(last checkpoint and {escape(result['student'])} written) before stopping")
    if r.cfg.train.all_trackers:
        r.accelerator.end_training()
    if r.main and r.cfg.train.plot:
        _plot(r.run_dir)
    return result


def _say_interrupted(run_dir: Path, resume_hint: str | None) -> None:
    good = ck.list_checkpoints(run_dir)
    where = f"the newest complete checkpoint is {escape(str(good[-1]))}" if good else "no checkpoint was saved yet"
    hint = f"; resume with: {escape(resume_hint)}" if good and resume_hint else ""
    say(f"[yellow]warning:[/] interrupted at once (a second Ctrl-C): this step was not saved; {where}{hint}")


def _check_finite(r: _Run) -> None:
    """HDError before the export when a trained weight holds NaN or inf: such a model is never written."""
    bad = [n for n, p in r.model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise HDError(f"the final weights are not finite ({len(bad)} tensor(s), e.g. {bad[0]}): "
                      f"{r.task.export_dir}/ was not written", "lower the learning rate, use bf16 rather than fp16, "
                      "or resume from an earlier checkpoint with --resume PATH")


# ---------------------------------------------------------------- set-up

@dataclass
class _Run:
    """Everything one run needs, built by ``_setup``: the task, Accelerate, data, schedule, models, optimiser."""

    cfg: Any
    task: Task
    run_dir: Path
    accelerator: Any
    loader: Iterable
    per_epoch: int  # micro-batches per epoch per rank
    accum: int
    n_steps: int
    global_batch: int
    peak: float
    warmup: int
    model: nn.Module  # the trainable module, unwrapped
    wrapped: nn.Module  # as prepared by Accelerate (DDP, autocast, compile)
    frozen: list[nn.Module]
    frozen_names: set[str]  # state-dict names of frozen tensors inside ``model`` (never checkpointed)
    params: list[nn.Parameter]
    raw_opt: torch.optim.AdamW
    optimizer: Any  # Accelerate's wrapper of raw_opt
    fp16: bool
    bad_before: int = 0  # unreadable images skipped by the segments before a resume (from state.json)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def _setup(make_task: Callable[[], Task], cfg, run_dir: Path, locks: list[RunLock], held: list[Any]) -> _Run:
    tc, oc = cfg.train, cfg.optim
    seed_all(tc.seed)  # identical initial weights on every rank
    task = make_task()  # before any distributed set-up: a bad name or path fails fast
    held.append(task)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)  # after it: a typo leaves no empty run dir behind
        if not locks:
            _lock(run_dir, locks)
    except OSError as e:
        raise ck.unwritable(run_dir, e) from None
    accelerator = make_accelerator(tc, run_dir, find_unused_parameters=task.find_unused_parameters)
    device, world = accelerator.device, accelerator.num_processes
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    loader = task.train_loader(rank=accelerator.process_index, world_size=world, seed=tc.seed)
    held.append(loader)
    try:
        per_epoch = len(loader)
    except TypeError:
        raise HDError("the training data has no length", "set data.epoch_steps (batches per epoch per rank)") from None
    if per_epoch < 1:
        raise HDError("the training data yields no batch per epoch",
                      "check the data path, or lower --batch-size below the number of images per rank")
    accum = tc.accum_steps
    n_steps = total_steps(epochs=tc.epochs, steps=tc.steps, batches_per_epoch=per_epoch, accum_steps=accum)
    global_batch = tc.batch_size * accum * world
    peak = scaled_lr(oc.blr, global_batch, oc.lr)
    warmup = oc.warmup_steps if oc.warmup_steps is not None else round(oc.warmup_epochs * per_epoch / accum)
    if accelerator.is_main_process and warmup >= n_steps:
        ui.warn(f"warm-up ({warmup} steps) is not shorter than the run ({n_steps} steps): the lr never reaches "
                f"its peak {peak:.3g}; set optim.warmup_epochs/warmup_steps")

    # models: the trainable one first (index 0 of accelerator._models: what checkpoints hold)
    model = task.model
    frozen = list(task.frozen)
    frozen_ids = {id(t) for m in frozen for t in (*m.parameters(), *m.buffers())}
    frozen_names = {n for n, t in (*model.named_parameters(), *model.named_buffers()) if id(t) in frozen_ids}
    if frozen_names:  # frozen submodules: DDP must neither broadcast nor reduce them
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(frozen_names))
    wrapped = accelerator.prepare_model(model)
    frozen = [accelerator.prepare_model(m, evaluation_mode=True) for m in frozen]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise HDError("the task has no trainable parameters")
    raw_opt = build_adamw(task.param_groups(model, oc.weight_decay), oc, peak, device)
    optimizer = accelerator.prepare_optimizer(raw_opt)

    def save_weights(models, weights, output_dir):
        weights.clear()  # only the trainable module, with unwrapped names, without frozen tensors
        weights.append({k: v for k, v in model.state_dict().items() if k not in frozen_names})

    def load_weights(models, input_dir):
        ck.load_trainable(model, frozen_names, Path(input_dir))
        models.clear()

    accelerator.register_save_state_pre_hook(save_weights)
    accelerator.register_load_state_pre_hook(load_weights)
    return _Run(cfg=cfg, task=task, run_dir=run_dir, accelerator=accelerator, loader=loader, per_epoch=per_epoch,
                accum=accum, n_steps=n_steps, global_batch=global_batch, peak=peak, warmup=warmup, model=model,
                wrapped=wrapped, frozen=frozen, frozen_names=frozen_names, params=params, raw_opt=raw_opt,
                optimizer=optimizer, fp16=accelerator.scaler is not None)


def _lock(run_dir: Path, locks: list[RunLock]) -> None:
    """The run dir's lock, taken by the main process of the launch (its other ranks are the same run)."""
    if not ui.is_main_process():
        return
    lock = RunLock(run_dir, "hd").acquire()
    locks.append(lock)
    if lock.took_over:
        ui.warn(f"took over a lock its earlier holder no longer holds ({escape(lock.took_over)})")
    if lock.unsupported:
        ui.warn(f"cannot lock {escape(str(run_dir))} ({lock.unsupported}): two runs on it would not be detected")


def _restore(r: _Run, ckpt: Path) -> int:
    """Load checkpoint ``ckpt`` (weights, optimiser moments; hyperparameters stay the config's); its step."""
    state = ck.read_state(ckpt)
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in r.raw_opt.param_groups]
    try:
        r.accelerator.load_state(str(ckpt))
        if len(r.raw_opt.param_groups) != len(fresh):
            raise ValueError(f"{len(fresh)} parameter groups, the checkpoint has {len(r.raw_opt.param_groups)}")
        for g, f in zip(r.raw_opt.param_groups, fresh, strict=True):
            g.update(f)  # moments and step counts from the checkpoint, hyperparameters from the config
    except HDError:
        raise
    except (ValueError, RuntimeError, KeyError) as e:
        raise HDError(f"checkpoint {ckpt} does not fit this run: {e}",
                      "resume with the run's own config (hd reads <run>/config.toml) or start a new --out") from None
    start = int(state["step"])
    r.bad_before = int(state.get("bad_images", 0))
    if start > r.n_steps:
        raise HDError(f"checkpoint {ckpt} is at step {start}, beyond this run's {r.n_steps} steps",
                      "raise --steps/--epochs, or resume from an earlier checkpoint")
    if r.main and (state.get("batches_per_epoch") != r.per_epoch or state.get("global_batch") != r.global_batch):
        ui.warn(f"resuming with {r.per_epoch} batches/epoch and global batch {r.global_batch} (checkpoint: "
                f"{state.get('batches_per_epoch')}, {state.get('global_batch')}): the data position is approximate")
    if r.main:
        say(f"resuming from {escape(str(ckpt))} (step {start}/{r.n_steps})")
    return start


def _config_changes(cfg, run_dir: Path, allowed: bool) -> dict[str, tuple[str, str]]:
    """What a resume changes of the settings that define the method and the model; HDError unless allowed."""
    from hdcli.config import identity_changes, read_toml

    if not (run_dir / CONFIG).is_file():
        return {}
    changes = identity_changes(cfg, read_toml(run_dir / CONFIG))
    if changes and not allowed:
        listed = "; ".join(f"{k}: {a} -> {b}" for k, a, b in ((k, *v) for k, v in changes.items()))
        raise HDError(f"resuming {run_dir} would change what it trains ({listed})",
                      "resume without those settings (the run's config.toml is the base), start a new --out, or "
                      "pass --allow-config-change to train a new segment (its config is recorded)")
    return changes


def _history_name(run_dir: Path, step: int) -> Path:
    """``config-history/until_step_N.toml``; a second change resumed from the same step never overwrites it."""
    base = run_dir / CONFIG_HISTORY / f"until_{ck.checkpoint_name(step)}"
    path, k = base.with_suffix(".toml"), 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}.{k}.toml")
    return path


def _open_run_dir(r: _Run, start: int, changes: dict[str, tuple[str, str]]) -> None:
    """The main process writes config.toml (keeping the previous segment's when ``changes``), trims
    metrics.jsonl to ``start``, clears interrupted saves and checks free space; then every rank waits."""
    if r.main:
        try:
            if changes:
                kept = _history_name(r.run_dir, start)
                atomic_write(kept, (r.run_dir / CONFIG).read_text())
            save_config(r.cfg, r.run_dir / CONFIG)
            ck.trim_metrics(r.run_dir, start)
            if changes:
                ck.append_metrics(r.run_dir, {"step": start, "config_change": {k: list(v) for k, v in changes.items()},
                                              "previous_config": str(kept.relative_to(r.run_dir))})
                ui.warn(f"config changed at step {start} ({', '.join(changes)}); the previous one is kept in "
                        f"{escape(str(kept))}")
            (r.run_dir / CHECKPOINTS).mkdir(exist_ok=True)
        except OSError as e:
            raise ck.unwritable(r.run_dir, e) from None
        for stale in (r.run_dir / CHECKPOINTS).glob(".tmp-*"):
            ck.rmtree(stale)  # an interrupted save leaves only a temp dir behind
        weights = _model_bytes(r.model, r.frozen_names)
        # checkpoints (weights + 2 Adam moments, 2 kept) and the export; a finished run only re-exports
        ck.check_free_space(r.run_dir, (weights if start >= r.n_steps else 2 * 3 * weights) + (64 << 20))
        if r.cfg.train.all_trackers:
            _init_trackers(r)
        say(f"training {r.n_steps} steps ({r.per_epoch} batches/epoch/rank, {r.world} process(es), global batch "
            f"{r.global_batch}, lr {r.peak:.3g}, warm-up {r.warmup}, {r.accelerator.mixed_precision} precision, "
            f"{r.device})")
    r.accelerator.wait_for_everyone()


def _save(r: _Run, step: int) -> Path:
    bad = torch.tensor(float(_bad_images(r)), device=r.device)
    bad = int(r.accelerator.reduce(bad, "sum").item()) if r.world > 1 else int(bad.item())
    return ck.save_checkpoint(r.accelerator, r.run_dir, step, {
        "step": step, "total_steps": r.n_steps, "epoch": (step * r.accum) // r.per_epoch,
        "batches_per_epoch": r.per_epoch, "global_batch": r.global_batch, "world_size": r.world,
        "bad_images": r.bad_before + bad,  # over the whole run, earlier segments included
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, r.cfg.train.keep_checkpoints)


def _bad_images(r: _Run) -> int:
    """Unreadable images this segment's loader skipped on this rank."""
    return int(getattr(r.loader, "bad_samples", 0) or 0)


def _train_mode(r: _Run) -> None:
    r.wrapped.train()
    for m in r.frozen:
        m.eval()


# ---------------------------------------------------------------- helpers of the loop

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


def resolve_mixed_precision(mode: str, cpu: bool = False) -> str:
    """``auto``: bf16 on a CUDA GPU that supports it, else no. fp16 needs a GPU."""
    cuda = torch.cuda.is_available() and not cpu
    if mode == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if mode == "fp16" and not cuda:
        raise HDError("fp16 mixed precision needs a CUDA GPU", "use --mixed-precision bf16 or no on the CPU")
    return mode


def make_accelerator(tc, run_dir: Path, find_unused_parameters: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    cpu = tc.cpu or not torch.cuda.is_available()  # Accelerate sets up multi-CPU (gloo) DDP only with cpu=True
    kwargs: dict[str, Any] = dict(
        mixed_precision=resolve_mixed_precision(tc.mixed_precision, cpu),
        cpu=cpu,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / TENSORBOARD)),
    )
    if find_unused_parameters:
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    for tracker in tc.all_trackers:
        try:
            __import__(tracker)
        except ImportError:
            raise HDError(f"--tracker {tracker} needs the {tracker} package", f"pip install 'hdcli[{tracker}]'") from None
    if tc.all_trackers:
        kwargs["log_with"] = tc.all_trackers
    if tc.compile:
        kwargs["dynamo_backend"] = "inductor"
    return Accelerator(**kwargs)


def _init_trackers(r: _Run) -> None:
    """Accelerate's trackers on the main process: TensorBoard in <run>/tensorboard, Weights & Biases in <run>/wandb
    (project ``$WANDB_PROJECT`` or ``hd``, run name = the run dir's; ``WANDB_MODE=offline`` works offline)."""
    from hdcli.config import to_dict

    init = {"wandb": {"dir": str(r.run_dir), "name": r.run_dir.name, "config": to_dict(r.cfg)}}
    try:
        r.accelerator.init_trackers(os.environ.get("WANDB_PROJECT", "hd") if "wandb" in r.cfg.train.all_trackers
                                    else "tensorboard", init_kwargs=init)
    except Exception as e:  # noqa: BLE001 - e.g. wandb's UsageError: no API key on a machine that never logged in
        raise HDError(f"--tracker {','.join(r.cfg.train.all_trackers)} could not start: {type(e).__name__}: {e}",
                      "for wandb: `wandb login`, or WANDB_MODE=offline (sync later with `wandb sync`)") from None


def _plot(run_dir: Path) -> None:
    """<run>/plots/*.png at the end of a run; a failure to plot is a warning, never a lost run."""
    from hdcli.watch import plot

    try:
        written = plot.plot_runs([run_dir])
    except Exception as e:  # noqa: BLE001 - the run is on disk; the plots are a convenience
        ui.warn(f"could not write the plots of {escape(str(run_dir))}: {e} (hd plot {escape(str(run_dir))} retries)")
        return
    if written:
        say(f"plots: {escape(str(written[0].parent))} ({len(written)} PNGs; hd plot compares runs)")


def _reset_accelerate() -> None:
    # Accelerate keeps its settings in process-wide singletons; several trainings in one process
    # (hd demo: pretrain -> distill -> finetune) need them cleared, else the second one fails.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def _model_bytes(model: nn.Module, frozen_names: set[str]) -> int:
    return sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n not in frozen_names)


