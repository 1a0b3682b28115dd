"""The one training loop of ``hd``: distill, finetune and pretrain plug a ``Task`` into ``train``.

A plain PyTorch loop (as in Accelerate's examples); Accelerate only places models, wraps the trainable
one in DDP, applies mixed precision / ``torch.compile``, and saves/loads state. Everything else is here:

- AdamW (fused where the device has it), lr = blr × global batch / 256, per-step cosine with linear
  warm-up computed from the step alone (no scheduler state), per-group ``lr_scale`` (layer decay),
  no weight decay for norms, biases, pos_embed and cls_token; grad clipping; gradient accumulation.
- Exact resume: the randomness of step s on rank r is seeded from (seed, r, s), each epoch's data
  iterator from (seed, epoch), and the data position is a pure function of the step, so a run
  resumed from a checkpoint continues exactly as if it had never stopped.
- Checkpoints ``<run>/checkpoints/step_XXXXXXX`` (``accelerator.save_state``) are written under a
  temporary name and renamed, so a directory named ``step_*`` is always complete; the last
  ``keep_checkpoints`` are kept. Only the trainable module's weights are saved (frozen teachers are
  rebuilt from their source, never copied into checkpoints).
- Non-finite steps are skipped on the device (fused AdamW's ``found_inf``) and counted; more than
  ``nan_tolerance`` in a row stops the run with an error. SIGTERM/SIGINT save a checkpoint at the
  next step boundary. Both are checked one step late so the loop never waits for the device.
- Logging: a rich progress bar (global main process), plain lines every ``log_every`` steps when
  not on a terminal, ``<run>/metrics.jsonl``, optional TensorBoard via Accelerate's tracker.

Do not pass a WebDataset loader through ``accelerator.prepare`` (it would dispatch from rank 0 and
drop data): the task builds a per-rank loader and the engine moves batches to the device itself.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape
from torch import nn

from hdcli import ui
from hdcli.config import save_config
from hdcli.errors import HDError

CHECKPOINTS = "checkpoints"
PREFIX = "step_"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token", "mask_token")


# ---------------------------------------------------------------- the task interface

class Task:
    """What the engine trains. Subclass it (distill, finetune, pretrain) and fill in:

    - ``model``: one ``nn.Module`` holding every trainable parameter (student + heads). The engine
      moves it to the device, wraps it (DDP, autocast, compile) and hands the wrapped module back to
      ``loss``; call that one so DDP syncs gradients.
    - ``frozen``: modules that are used but never trained (teachers). Each goes through
      ``accelerator.prepare_model(m, evaluation_mode=True)``: device, autocast, no DDP, eval mode.
      Their tensors are never written to checkpoints, also if they are submodules of ``model``.
    - ``train_loader(rank=, world_size=, seed=)``: an iterable of batches for this rank with
      ``len()`` = batches per epoch (the same on every rank). Batches stay on the host (uint8 images);
      the engine moves tensors to the device. If the loader has ``set_epoch(epoch)`` it is called
      before each epoch; data order and augmentation must depend only on (seed, epoch, rank).
    - ``loss(model, batch)``: a dict of scalar tensors with key ``"loss"`` (what is minimised); every
      entry is averaged and logged.
    - ``export(model, out_dir)``: write the result (unwrapped ``model``) into the empty ``out_dir``;
      the engine renames it to ``<run>/<export_dir>`` afterwards (atomic).
    - optional ``param_groups(model, weight_decay)`` (e.g. timm's layer decay; groups may carry
      ``lr_scale``) and ``evaluate(model, accelerator, epoch) -> dict | None`` (after each finished
      epoch, 0-based index, on all ranks; the returned numbers are logged); attributes ``log_keys``,
      ``export_dir`` (default ``student``) and ``find_unused_parameters`` (DDP).
    """

    model: nn.Module
    frozen: Sequence[nn.Module] = ()
    log_keys: Sequence[str] = ("loss",)  # loss-dict entries shown in the progress bar and log lines
    export_dir: str = "student"
    find_unused_parameters: bool = False  # DDP: set when some trainable parameters get no gradient

    def train_loader(self, *, rank: int, world_size: int, seed: int) -> Iterable:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def export(self, model: nn.Module, out_dir: Path) -> None:
        raise NotImplementedError

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        return param_groups_weight_decay(model, weight_decay)

    def evaluate(self, model: nn.Module, accelerator, epoch: int) -> dict[str, float] | None:
        return None


# ---------------------------------------------------------------- pure pieces

def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for weight matrices; none for norms/biases (ndim ≤ 1), pos_embed, cls_token
    and whatever a submodule's ``no_weight_decay()`` names (timm's convention, prefixed by its path)."""
    skip: set[str] = set()
    for mname, m in model.named_modules():
        fn = getattr(m, "no_weight_decay", None)
        if callable(fn):
            skip |= {f"{mname}.{n}" if mname else n for n in fn()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


def lr_at(step: int, *, total: int, warmup: int, peak: float, min_lr: float = 0.0) -> float:
    """Learning rate of 0-based optimiser step ``step``: linear warm-up from 0 (MAE's lr_sched), then a
    half-cosine from ``peak`` to ``min_lr`` at ``total``."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def scaled_lr(blr: float, global_batch: int, lr: float | None = None) -> float:
    """lr = blr × global batch / 256 (METHOD.md), unless an absolute ``lr`` is given."""
    return lr if lr is not None else blr * global_batch / 256


def seed_of(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64), so nearby (seed, rank, step) give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 29)) & 0x7FFFFFFFFFFFFFFF


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def total_steps(*, epochs: int, steps: int | None, batches_per_epoch: int, accum_steps: int) -> int:
    """Optimiser steps of a run: ``steps`` when set, else epochs × batches per epoch / accumulation."""
    if steps is not None:
        return steps
    return max(1, epochs * batches_per_epoch // accum_steps)


# ---------------------------------------------------------------- checkpoints

def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run (``step_*`` dirs holding state.json), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(PREFIX) and d.name[len(PREFIX):].isdigit() and (d / STATE_FILE).is_file():
            found.append((int(d.name[len(PREFIX):]), d))
    return [d for _, d in sorted(found)]


def find_checkpoint(resume: str | os.PathLike | None, run_dir: str | os.PathLike) -> Path | None:
    """``auto``: the newest complete checkpoint of ``run_dir`` (None if there is none); a path: that
    checkpoint, or the newest one of the run dir / checkpoints dir it names."""
    if resume is None:
        return None
    if str(resume) == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    for run in (path, path.parent):
        found = list_checkpoints(run)
        if found and (path == run or path.name == CHECKPOINTS):
            return found[-1]
    raise HDError(f"no complete checkpoint at {path}",
                  "give a checkpoints/step_* dir, a run dir, or --resume auto")


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise HDError(f"checkpoint {ckpt} is unreadable ({e})", "resume from an older one or start afresh") from None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def fault_injected(name: str) -> str | None:
    """For tests only: ``HD_FAULT_INJECT="free_bytes=1000"`` (comma-separated NAME=VALUE) makes the engine
    behave as if that fault were real. ``free_bytes``: the free space the disk check sees."""
    for item in os.environ.get("HD_FAULT_INJECT", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == name:
            return value.strip()
    return None


def check_free_space(path: Path, need: int) -> None:
    """HDError when ``path``'s filesystem has less than ``need`` bytes free (checked before the first save)."""
    free = shutil.disk_usage(path).free
    if (fake := fault_injected("free_bytes")) is not None:
        free = min(free, int(fake))
    if free < need:
        raise HDError(f"only {_fmt_bytes(free)} free under {path}; checkpoints and the export need about "
                      f"{_fmt_bytes(need)}", "free some space, lower --keep-checkpoints, or choose another --out")


def _unwritable(run_dir: Path, e: OSError) -> HDError:
    return HDError(f"cannot write to the run dir {run_dir}: {e.strerror or e}",
                   "check its permissions and free space, or choose another --out")


def _rmtree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _reason(e: BaseException) -> str:
    """One line saying why a write failed: OSError's text, or the first line of a library's error (a full
    disk reaches safetensors as SafetensorError and torch.save as RuntimeError, not as OSError)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text[:300]


# ---------------------------------------------------------------- helpers of the loop

def to_device(batch, device: torch.device):
    """Tensors of a (nested) batch to ``device``; on CUDA through pinned memory so the copy is asynchronous."""
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda" and batch.device.type == "cpu" and not batch.is_pinned():
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class _Stream:
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
        seed_all(seed_of(self.seed, 1, epoch))  # worker seeds / samplers that draw from the global RNG
        it = iter(self.loader)
        for _ in range(skip):  # resume mid-epoch: replay the order, skip the batches already trained on
            next(it)
        return it


class _Signals:
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
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
    )
    if find_unused_parameters:
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    if tc.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise HDError("--tensorboard needs the tensorboard package", "pip install 'hdcli[tensorboard]'") from None
        kwargs["log_with"] = "tensorboard"
    if tc.compile:
        kwargs["dynamo_backend"] = "inductor"
    return Accelerator(**kwargs)


def _reset_accelerate() -> None:
    # Accelerate keeps its settings in process-wide singletons; several trainings in one process
    # (hd demo: pretrain -> distill -> finetune) need them cleared, else the second one fails.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def _fused_ok(device: torch.device) -> bool:
    return device.type in ("cuda", "cpu")


def _model_bytes(model: nn.Module, frozen_names: set[str]) -> int:
    return sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n not in frozen_names)


# ---------------------------------------------------------------- the loop

def train(make_task: Callable[[], Task], cfg, run_dir: str | os.PathLike, *, resume: str | None = None,
          resume_hint: str | None = None) -> dict:
    """Train ``make_task()`` with ``cfg.train``/``cfg.optim`` into ``run_dir``; return a summary dict.

    ``make_task`` is called first, right after seeding (every rank builds the same initial weights;
    a bad name or path fails before any distributed set-up); it builds its models on the CPU. ``resume``: None (refuse a run dir that already holds checkpoints), ``"auto"``
    (newest complete checkpoint of ``run_dir``, or a fresh start) or a checkpoint/run path.
    ``resume_hint``: the command that resumes this run, printed after SIGTERM/SIGINT.
    """
    try:
        return _train(make_task, cfg, Path(run_dir), resume, resume_hint)
    finally:
        _reset_accelerate()


def _train(make_task, cfg, run_dir: Path, resume, resume_hint) -> dict:
    tc, oc = cfg.train, cfg.optim
    run_dir = run_dir.resolve()
    ckpt = find_checkpoint(resume, run_dir)
    if resume is None and list_checkpoints(run_dir):
        raise HDError(f"{run_dir} already holds checkpoints of a run",
                      "add --resume auto to continue it, or choose another --out")

    seed_all(tc.seed)  # identical initial weights on every rank
    task = make_task()  # before any distributed set-up: a bad name or path fails fast
    try:
        run_dir.mkdir(parents=True, exist_ok=True)  # after it: a typo leaves no empty run dir behind
    except OSError as e:
        raise _unwritable(run_dir, e) from None
    accelerator = make_accelerator(tc, run_dir, find_unused_parameters=task.find_unused_parameters)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    loader = task.train_loader(rank=rank, world_size=world, seed=tc.seed)
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
    if main and warmup >= n_steps:
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
    groups = task.param_groups(model, oc.weight_decay)
    raw_opt = torch.optim.AdamW(groups, lr=peak, betas=tuple(oc.betas), eps=oc.eps,
                                fused=True if _fused_ok(device) else None)
    optimizer = accelerator.prepare_optimizer(raw_opt)
    for g in raw_opt.param_groups:
        g.setdefault("lr_scale", 1.0)
    fp16 = accelerator.scaler is not None  # GradScaler skips overflowing steps itself

    def _save_weights(models, weights, output_dir):
        weights.clear()  # only the trainable module, with unwrapped names, without frozen tensors
        weights.append({k: v for k, v in model.state_dict().items() if k not in frozen_names})

    def _load_weights(models, input_dir):
        _load_trainable(model, frozen_names, Path(input_dir))
        models.clear()

    accelerator.register_save_state_pre_hook(_save_weights)
    accelerator.register_load_state_pre_hook(_load_weights)

    start = 0
    if ckpt is not None:
        state = read_state(ckpt)
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in raw_opt.param_groups]
        try:
            accelerator.load_state(str(ckpt))
            if len(raw_opt.param_groups) != len(fresh):
                raise ValueError(f"{len(fresh)} parameter groups, the checkpoint has {len(raw_opt.param_groups)}")
            for g, f in zip(raw_opt.param_groups, fresh, strict=True):
                g.update(f)  # moments and step counts from the checkpoint, hyperparameters from the config
        except HDError:
            raise
        except (ValueError, RuntimeError, KeyError) as e:
            raise HDError(f"checkpoint {ckpt} does not fit this run: {e}",
                          "resume with the run's own config (hd reads <run>/config.toml) or start a new --out") from None
        start = int(state["step"])
        if start > n_steps:
            raise HDError(f"checkpoint {ckpt} is at step {start}, beyond this run's {n_steps} steps",
                          "raise --steps/--epochs, or resume from an earlier checkpoint")
        if main and (state.get("batches_per_epoch") != per_epoch or state.get("global_batch") != global_batch):
            ui.warn(f"resuming with {per_epoch} batches/epoch and global batch {global_batch} (checkpoint: "
                    f"{state.get('batches_per_epoch')}, {state.get('global_batch')}): the data position is approximate")
        if main:
            _say(f"resuming from {escape(str(ckpt))} (step {start}/{n_steps})")
    elif resume == "auto" and main:
        _say(f"no checkpoint in {escape(str(run_dir / CHECKPOINTS))}: starting from scratch")

    if main:
        try:
            save_config(cfg, run_dir / "config.toml")
            _trim_metrics(run_dir / METRICS_FILE, start)
            (run_dir / CHECKPOINTS).mkdir(exist_ok=True)
        except OSError as e:
            raise _unwritable(run_dir, e) from None
        for stale in (run_dir / CHECKPOINTS).glob(".tmp-*"):
            _rmtree(stale)  # an interrupted save leaves only a temp dir behind
        check_free_space(run_dir, 2 * 3 * _model_bytes(model, frozen_names) + (64 << 20))
        if tc.tensorboard:
            accelerator.init_trackers("tensorboard")
        _say(f"training {n_steps} steps ({per_epoch} batches/epoch/rank, {world} process(es), global batch "
                f"{global_batch}, lr {peak:.3g}, warm-up {warmup}, {accelerator.mixed_precision} precision, {device})")
    accelerator.wait_for_everyone()

    def save(step: int) -> Path:
        return _save_checkpoint(accelerator, run_dir, step, {
            "step": step, "total_steps": n_steps, "epoch": (step * accum) // per_epoch,
            "batches_per_epoch": per_epoch, "global_batch": global_batch, "world_size": world,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }, tc.keep_checkpoints)

    stream = _Stream(loader, per_epoch, start * accum, tc.seed)
    has_eval = type(task).evaluate is not Task.evaluate
    wrapped.train()
    for m in frozen:
        m.eval()
    streak = torch.zeros((), device=device)
    skipped = torch.zeros((), device=device)
    pending: torch.Tensor | None = None
    sums: dict[str, torch.Tensor] = {}
    window, t_window = 0, time.perf_counter()
    t_start = t_window
    first_loss = last_loss = None
    last_saved = start if ckpt is not None else None
    stopped: int | None = None
    grad_norm = torch.zeros((), device=device)
    no_signal = torch.zeros((), device=device)  # made once: a host->device copy per step would sync
    bar = ui.progress() if main else None
    bar_task = None

    with _Signals() as signals, (bar if bar is not None else nullcontext()):
        if bar is not None:
            bar_task = bar.add_task(task.__class__.__name__.removesuffix("Task").lower() or "train",
                                    total=n_steps, completed=start, info="")
        for step in range(start, n_steps):
            lr = lr_at(step, total=n_steps, warmup=warmup, peak=peak, min_lr=oc.min_lr)
            for g in raw_opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            for micro in range(accum):
                batch = stream.next()
                seed_all(seed_of(tc.seed, 2, rank, step, micro))  # model-side randomness (drop path, ...)
                batch = to_device(batch, device)
                sync = micro == accum - 1
                with nullcontext() if sync else accelerator.no_sync(wrapped):
                    out = task.loss(wrapped, batch)
                    if "loss" not in out:
                        raise HDError(f"{type(task).__name__}.loss() returned no 'loss' entry")
                    accelerator.backward(out["loss"] / accum)
                for k, v in out.items():
                    v = v.detach().float()
                    sums[k] = sums[k] + v / accum if k in sums else v / accum
            grad_norm = accelerator.clip_grad_norm_(params, oc.clip_grad if oc.clip_grad else float("inf"))
            bad = ~torch.isfinite(out["loss"].detach()) if fp16 else ~torch.isfinite(grad_norm)
            if not fp16:
                raw_opt.found_inf = bad.float()  # fused AdamW skips the update on the device
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            badf = bad.float()
            streak = (streak + 1) * badf
            skipped = skipped + badf
            window += 1
            done = step + 1

            # control values of this step (non-finite streak, stop request), agreed by all ranks; read one
            # step late so the host never waits for the device
            sig = no_signal if not signals.received else torch.full((), float(signals.received), device=device)
            ctrl = torch.stack([streak, sig])
            if world > 1:
                torch.distributed.all_reduce(ctrl, op=torch.distributed.ReduceOp.MAX)
            if pending is not None:
                stopped = stopped or _check(pending, tc.nan_tolerance, done - 1, run_dir)
            pending = ctrl
            if done == n_steps:  # the last step: nothing comes after it to carry the check
                _check(pending, tc.nan_tolerance, done, run_dir)
                stopped = None  # a stop request at the very end: just finish (export included)

            if bar is not None:
                bar.update(bar_task, advance=1)
            epochs_done = accum * done // per_epoch
            epoch_end = has_eval and epochs_done > accum * (done - 1) // per_epoch
            if done % tc.log_every == 0 or done == n_steps or stopped or epoch_end:
                keys = list(sums)
                bad_images = torch.tensor(float(getattr(loader, "bad_samples", 0) or 0), device=device)
                vals = torch.stack([sums[k] for k in keys] + [bad_images * world, skipped, grad_norm.detach().float()])
                vals = accelerator.reduce(vals, "mean") if world > 1 else vals
                vals = vals.tolist()
                dt = time.perf_counter() - t_window
                rec = {"step": done, "epoch": round(accum * done / per_epoch, 4), "lr": lr,
                       **{k: v / window for k, v in zip(keys, vals, strict=False)},
                       "grad_norm": vals[-1], "skipped_steps": int(round(vals[-2])),
                       "bad_images": int(round(vals[-3])),
                       "img_per_s": global_batch * window / max(dt, 1e-9), "time_s": time.perf_counter() - t_start}
                sums, window, t_window = {}, 0, time.perf_counter()
                first_loss = rec["loss"] if first_loss is None else first_loss
                last_loss = rec["loss"]
                if epoch_end:
                    extra = task.evaluate(accelerator.unwrap_model(wrapped), accelerator, epochs_done - 1)
                    wrapped.train()
                    for m in frozen:
                        m.eval()
                    rec.update(extra or {})
                if main:
                    eta = rec["time_s"] / (done - start) * (n_steps - done)
                    _log(rec, task.log_keys, set(keys), n_steps, eta, bar, bar_task, run_dir)
                    if tc.tensorboard:
                        accelerator.log({k: v for k, v in rec.items() if isinstance(v, int | float)}, step=done)
            if stopped or done % tc.save_every == 0 or done == n_steps:
                save(done)
                last_saved = done
            if stopped:
                break

    result = {"run_dir": str(run_dir), "steps": last_saved if stopped else n_steps, "total_steps": n_steps,
              "first_loss": first_loss, "last_loss": last_loss, "time_s": time.perf_counter() - t_start,
              "interrupted": signal.Signals(stopped).name if stopped else None, "student": None}
    if stopped:
        if main:
            hint = resume_hint or f"--out {run_dir} --resume auto"
            where = escape(str(run_dir / CHECKPOINTS / checkpoint_name(last_saved)))
            _say(f"[yellow]warning:[/] {signal.Signals(stopped).name} received: stopped at step {last_saved}/{n_steps}, "
                 f"checkpoint saved in {where}. Resume with: {escape(hint)}")
        accelerator.wait_for_everyone()
    else:
        if last_saved != n_steps:  # the loop saves its last step; this only covers an empty loop
            save(n_steps)
        result["student"] = str(_export(task, accelerator, accelerator.unwrap_model(wrapped), run_dir))
        if main:
            loss_txt = f"; loss {first_loss:.4f} → {last_loss:.4f}" if first_loss is not None else ""
            _say(f"done: {n_steps} steps in {_fmt_time(result['time_s'])}{loss_txt}; "
                    f"{task.export_dir} in {escape(result['student'])}")
    if tc.tensorboard:
        accelerator.end_training()
    return result


def _check(ctrl: torch.Tensor, tolerance: int, step: int, run_dir: Path) -> int | None:
    """Read a step's control values (one host sync): HDError on too many non-finite steps; the signal, if any."""
    streak, sig = ctrl.tolist()
    if streak > tolerance:
        good = list_checkpoints(run_dir)
        raise HDError(f"the loss was not finite for {int(streak)} consecutive steps (up to step {step}); "
                      f"the run stopped" + (f", last good checkpoint {good[-1]}" if good else ""),
                      "lower the learning rate, use bf16 rather than fp16, check the data, or raise --nan-tolerance")
    return int(sig) or None


def _load_trainable(model: nn.Module, frozen_names: set[str], ckpt: Path) -> None:
    """Load the trainable weights of a checkpoint; HDError listing missing/unexpected keys on a mismatch."""
    from safetensors.torch import load_file

    path = ckpt / "model.safetensors"
    if not path.is_file():
        raise HDError(f"checkpoint {ckpt} has no model.safetensors", "it is incomplete or not an hd checkpoint")
    try:
        sd = load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError: a file cut or changed after the checkpoint was written
        raise HDError(f"checkpoint {ckpt} is unreadable ({_reason(e)})", "resume from an older one or start afresh") from None
    own = model.state_dict()
    expected = {k for k in own if k not in frozen_names}
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    shape = sorted(k for k in expected & sd.keys() if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shape:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)):
            if keys:
                parts.append(f"{what}: {', '.join(keys[:6])}" + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else ""))
        raise HDError(f"checkpoint {ckpt} was written for another model ({'; '.join(parts)})",
                      "resume with the run's own config, or start a new --out")
    model.load_state_dict(sd, strict=False)


def _save_checkpoint(accelerator, run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """accelerator.save_state into a temp dir, then rename: a ``step_*`` dir is always complete."""
    root = run_dir / CHECKPOINTS
    final, tmp = root / checkpoint_name(step), root / f".tmp-{checkpoint_name(step)}"
    main = accelerator.is_main_process
    accelerator.wait_for_everyone()
    try:
        if main:
            _rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
            if final.exists():  # the same step saved before (e.g. stopped right after a periodic save)
                _rmtree(final)
            os.replace(tmp, final)
    except Exception as e:  # OSError, SafetensorError, RuntimeError: a failed save is an error, never skipped
        if main:
            _rmtree(tmp)
        raise HDError(f"could not write checkpoint {final}: {_reason(e)}",
                      "check free space and permissions of the run dir; earlier checkpoints are intact") from None
    if main:
        for old in list_checkpoints(run_dir)[:-keep]:
            _rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _export(task: Task, accelerator, model: nn.Module, run_dir: Path) -> Path:
    final = run_dir / task.export_dir
    tmp, old = run_dir / f".tmp-{task.export_dir}", run_dir / f".old-{task.export_dir}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _rmtree(tmp)
        try:
            tmp.mkdir(parents=True)
            task.export(model, tmp)
            if final.exists():
                _rmtree(old)
                os.replace(final, old)
            os.replace(tmp, final)
        except HDError:
            _rmtree(tmp)
            raise
        except Exception as e:  # OSError, SafetensorError, RuntimeError (a full disk): an error, never skipped
            _rmtree(tmp)
            raise HDError(f"could not write {final}: {_reason(e)}",
                          "check free space and permissions; the checkpoints are intact") from None
        _rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _trim_metrics(path: Path, step: int) -> None:
    """On resume drop the records written after the checkpoint (they are trained again)."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue  # a line cut by a crash
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _say(msg: str) -> None:
    """A message that stays on one line in cluster logs (paths are copied from there)."""
    ui.console.print(msg, soft_wrap=True)


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _log(rec: dict, keys: Sequence[str], loss_keys: set[str], n_steps: int, eta: float, bar, bar_task,
         run_dir: Path) -> None:
    try:
        with open(run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(rec) + "\n")
    except OSError as e:  # a full disk mid-run: an error, never a silently missing record
        raise _unwritable(run_dir, e) from None
    shown = " ".join(f"{k} {rec[k]:.4f}" for k in keys if k in rec)
    info = f"{shown} lr {rec['lr']:.2e} {rec['img_per_s']:.0f} img/s"
    if rec.get("skipped_steps"):
        info += f" skipped {rec['skipped_steps']}"
    if rec.get("bad_images"):
        info += f" bad images {rec['bad_images']}"
    if bar is not None and not bar.disable:
        bar.update(bar_task, info=info)
        return
    extra = " ".join(f"{k} {v:.4g}" for k, v in rec.items()
                     if k not in loss_keys and k not in ("step", "epoch", "lr", "img_per_s", "time_s", "grad_norm",
                                                         "skipped_steps", "bad_images")
                     and isinstance(v, int | float))
    line = f"step {rec['step']}/{n_steps} ep {rec['epoch']:.2f} {info}" + (f" {extra}" if extra else "")
    ui.console.print(line + f" eta {_fmt_time(eta)}", soft_wrap=True, markup=False)  # one line per record in logs
