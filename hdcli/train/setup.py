"""A run's set-up, apart from the loop (:mod:`hdcli.train.engine`): the run dir's lock, the checkpoint to resume,
the config history, Accelerate (device, DDP, mixed precision, compile), the step plan, the optimiser, trackers.

:func:`prepare` returns a :class:`Run`: three small records (the :class:`Plan` of steps, the :class:`Models`, the
:class:`Optim`) beside the task, the loader and Accelerate.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
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
from hdcli.seeding import seed_all
from hdcli.train import checkpoints as ck
from hdcli.train.log import say
from hdcli.train.optim import build_adamw, scaled_lr, total_steps
from hdcli.train.task import Member, Task


@dataclass(frozen=True)
class Plan:
    """The run's length: micro-batches per epoch per rank, accumulation, optimiser steps, the global batch and the
    warm-up steps."""

    per_epoch: int
    accum: int
    n_steps: int
    global_batch: int
    warmup: int

    def epoch(self, done: int) -> float:
        """Epochs done after optimiser step ``done`` (fractional)."""
        return round(self.accum * done / self.per_epoch, 4)

    def epochs_done(self, done: int) -> int:
        return self.accum * done // self.per_epoch


@dataclass
class Models:
    """The trainable module (``model``), as Accelerate wrapped it (``wrapped``: DDP, autocast, compile), and its
    frozen submodules (``frozen``; their tensors ``frozen_names`` are never checkpointed)."""

    model: nn.Module
    wrapped: nn.Module
    frozen: list[nn.Module]
    frozen_names: set[str]

    def train(self) -> None:
        self.wrapped.train()
        for m in self.frozen:
            m.eval()


@dataclass
class Optim:
    """The AdamW of one member (the whole model, or one student of several): ``params`` (``raw``; ``wrapped`` is
    Accelerate's wrapper), its peak and floor lr, its clipping norm; ``fp16``: a gradient scaler skips overflowing
    steps itself. ``name`` prefixes its record entries, ``dir`` holds its records ("" for a single model)."""

    name: str
    dir: str
    params: list[nn.Parameter]
    raw: torch.optim.AdamW
    wrapped: Any
    peak: float
    min_lr: float
    clip: float | None
    fp16: bool


@dataclass
class Run:
    """One run, as :func:`prepare` built it."""

    cfg: Any
    task: Task
    run_dir: Path
    accelerator: Any
    loader: Iterable
    plan: Plan
    models: Models
    optims: list[Optim]
    bad_before: int = 0  # unreadable images skipped by the segments before a resume (from state.json)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def prepare(make_task: Callable[[], Task], cfg, run_dir: Path, locks: list[RunLock], held: list[Any]) -> Run:
    """Build the task (after seeding: every rank builds the same weights; a bad name fails before any distributed
    set-up), lock the run dir, set up Accelerate, the loader, the plan, the models and the optimiser."""
    tc, oc = cfg.train, cfg.optim
    seed_all(tc.seed)
    task = make_task()
    held.append(task)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)  # after it: a typo leaves no empty run dir behind
        if not locks:
            lock(run_dir, locks)
    except OSError as e:
        raise ck.unwritable(run_dir, e) from None
    accelerator = make_accelerator(tc, run_dir, find_unused_parameters=task.find_unused_parameters)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    loader = task.train_loader(rank=accelerator.process_index, world_size=accelerator.num_processes, seed=tc.seed)
    held.append(loader)
    plan = make_plan(cfg, loader, accelerator.num_processes)
    models = prepare_models(task, accelerator)
    members = list(task.members) or [Member("", models.model, oc, "")]
    optims = [make_optim(task, m, plan, accelerator) for m in members]
    if accelerator.is_main_process and plan.warmup >= plan.n_steps:
        ui.warn(f"warm-up ({plan.warmup} steps) is not shorter than the run ({plan.n_steps} steps): the lr never "
                f"reaches its peak {optims[0].peak:.3g}; set optim.warmup_epochs/warmup_steps")
    return Run(cfg, task, run_dir, accelerator, loader, plan, models, optims)


def make_optim(task: Task, member: Member, plan: Plan, accelerator) -> Optim:
    """The AdamW of one member: its parameter groups (``task.param_groups``), lr = its blr × global batch / 256."""
    oc = member.optim
    params = [p for p in member.module.parameters() if p.requires_grad]
    if not params:
        raise HDError("the task has no trainable parameters" + (f" in {member.name!r}" if member.name else ""))
    peak = scaled_lr(oc.blr, plan.global_batch, oc.lr)
    raw = build_adamw(task.param_groups(member.module, oc.weight_decay), oc, peak, accelerator.device)
    return Optim(member.name, member.dir, params, raw, accelerator.prepare_optimizer(raw), peak, oc.min_lr,
                 oc.clip_grad, fp16=accelerator.scaler is not None)


def make_plan(cfg, loader, world: int) -> Plan:
    tc, oc = cfg.train, cfg.optim
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
    warmup = oc.warmup_steps if oc.warmup_steps is not None else round(oc.warmup_epochs * per_epoch / accum)
    return Plan(per_epoch, accum, n_steps, global_batch, warmup)


def prepare_models(task: Task, accelerator) -> Models:
    """The trainable module first (index 0 of ``accelerator._models``: what checkpoints hold), then its frozen
    submodules, which DDP neither broadcasts nor reduces and checkpoints never hold."""
    model, frozen = task.model, list(task.frozen)
    frozen_ids = {id(t) for m in frozen for t in (*m.parameters(), *m.buffers())}
    frozen_names = {n for n, t in (*model.named_parameters(), *model.named_buffers()) if id(t) in frozen_ids}
    if frozen_names:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(frozen_names))
    wrapped = accelerator.prepare_model(model)
    frozen = [accelerator.prepare_model(m, evaluation_mode=True) for m in frozen]

    def save_weights(models, weights, output_dir):
        weights.clear()  # only the trainable module, with unwrapped names, without frozen tensors
        weights.append({k: v for k, v in model.state_dict().items() if k not in frozen_names})

    def load_weights(models, input_dir):
        ck.load_trainable(model, frozen_names, Path(input_dir))
        models.clear()

    accelerator.register_save_state_pre_hook(save_weights)
    accelerator.register_load_state_pre_hook(load_weights)
    return Models(model, wrapped, frozen, frozen_names)


def lock(run_dir: Path, locks: list[RunLock]) -> None:
    """The run dir's lock, taken by the main process of the launch (its other ranks are the same run)."""
    if not ui.is_main_process():
        return
    try:
        held = RunLock(run_dir, "hd").acquire()
    except OSError as e:  # a read-only mount, a dir without write permission
        raise ck.unwritable(run_dir, e) from None
    locks.append(held)
    if held.took_over:
        ui.warn(f"took over a lock its earlier holder no longer holds ({escape(held.took_over)})")
    if held.unsupported:
        ui.warn(f"cannot lock {escape(str(run_dir))} ({held.unsupported}): two runs on it would not be detected")


# what --allow-config-change can and cannot change: a checkpoint is loaded tensor by tensor, by name and shape
ALLOWED_CHANGES = ("changes that keep every trained tensor's name and shape load (alpha, beta, masking, drop ratio, "
                   "loss weights, the teachers' checkpoints of the same architectures, relation blocks with the same "
                   "heads); adding or removing a teacher or target, a norm to or from running statistics, another "
                   "image size, student or head width do not")


def restore(r: Run, ckpt: Path, changes: dict[str, tuple[str, str]] | None = None) -> int:
    """Load checkpoint ``ckpt`` (weights, optimiser moments; hyperparameters stay the config's); its step.
    ``changes``: what an ``--allow-config-change`` resume changed (said when the checkpoint does not fit)."""
    state = ck.read_state(ckpt)
    plan = r.plan
    fresh = [[{k: v for k, v in g.items() if k != "params"} for g in o.raw.param_groups] for o in r.optims]
    try:
        r.accelerator.load_state(str(ckpt))
        for o, groups in zip(r.optims, fresh, strict=True):
            if len(o.raw.param_groups) != len(groups):
                raise ValueError(f"{len(groups)} parameter groups, the checkpoint has {len(o.raw.param_groups)}")
            for g, f in zip(o.raw.param_groups, groups, strict=True):
                g.update(f)  # moments and step counts from the checkpoint, hyperparameters from the config
    except (HDError, ValueError, RuntimeError, KeyError) as e:
        why = e.problem if isinstance(e, HDError) else str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        if changes:
            raise HDError(f"{why} after changing {', '.join(changes)}",
                          f"--allow-config-change: {ALLOWED_CHANGES}; start a new --out instead (--student-init "
                          "carries the student's weights over)") from None
        if isinstance(e, HDError):
            raise
        raise HDError(f"checkpoint {ckpt} does not fit this run: {why}",
                      "resume with the run's own config (hd reads <run>/config.toml) or start a new --out") from None
    start = int(state["step"])
    r.bad_before = int(state.get("bad_images", 0))
    if start > plan.n_steps:
        raise HDError(f"checkpoint {ckpt} is at step {start}, beyond this run's {plan.n_steps} steps",
                      "raise --steps/--epochs, or resume from an earlier checkpoint")
    if r.main and (state.get("batches_per_epoch") != plan.per_epoch or state.get("global_batch") != plan.global_batch):
        ui.warn(f"resuming with {plan.per_epoch} batches/epoch and global batch {plan.global_batch} (checkpoint: "
                f"{state.get('batches_per_epoch')}, {state.get('global_batch')}): the data position is approximate")
    if r.main:
        say(f"resuming from {escape(str(ckpt))} (step {start}/{plan.n_steps})")
    return start


def config_changes(cfg, run_dir: Path, allowed: bool) -> dict[str, tuple[str, str]]:
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


def history_name(run_dir: Path, step: int) -> Path:
    """``config-history/until_step_N.toml``; a second change resumed from the same step never overwrites it."""
    base = run_dir / CONFIG_HISTORY / f"until_{ck.checkpoint_name(step)}"
    path, k = base.with_suffix(".toml"), 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}.{k}.toml")
    return path


def open_run_dir(r: Run, start: int, changes: dict[str, tuple[str, str]]) -> None:
    """The main process writes config.toml (keeping the previous segment's when ``changes``), trims
    metrics.jsonl to ``start``, clears interrupted saves and checks free space; then every rank waits."""
    plan, run_dir = r.plan, r.run_dir
    if r.main:
        try:
            if changes:
                kept = history_name(run_dir, start)
                atomic_write(kept, (run_dir / CONFIG).read_text())
            save_config(r.cfg, run_dir / CONFIG)
            for where in dict.fromkeys(["", *(o.dir for o in r.optims)]):  # the run's records, each member's
                (run_dir / where).mkdir(parents=True, exist_ok=True)
                ck.trim_metrics(run_dir / where, start)
            for m in r.task.members:
                if m.config is not None:
                    save_config(m.config, run_dir / m.dir / CONFIG)
            if changes:
                ck.append_metrics(run_dir, {"step": start, "config_change": {k: list(v) for k, v in changes.items()},
                                            "previous_config": str(kept.relative_to(run_dir))})
                ui.warn(f"config changed at step {start} ({', '.join(changes)}); the previous one is kept in "
                        f"{escape(str(kept))}")
            (run_dir / CHECKPOINTS).mkdir(exist_ok=True)
        except OSError as e:
            raise ck.unwritable(run_dir, e) from None
        for stale in (run_dir / CHECKPOINTS).glob(".tmp-*"):
            ck.rmtree(stale)  # an interrupted save leaves only a temp dir behind
        weights = model_bytes(r.models)
        # checkpoints (weights + 2 Adam moments, 2 kept) and the export; a finished run only re-exports
        ck.check_free_space(run_dir, (weights if start >= plan.n_steps else 2 * 3 * weights) + (64 << 20))
        if r.cfg.train.all_trackers:
            init_trackers(r)
        lrs = ", ".join(f"{o.name + ' ' if o.name else ''}{o.peak:.3g}" for o in r.optims)
        say(f"training {plan.n_steps} steps ({plan.per_epoch} batches/epoch/rank, {r.world} process(es), global batch "
            f"{plan.global_batch}, lr {lrs}, warm-up {plan.warmup}, {r.accelerator.mixed_precision} "
            f"precision, {r.accelerator.device})")
    r.accelerator.wait_for_everyone()


def model_bytes(models: Models) -> int:
    return sum(t.numel() * t.element_size() for n, t in models.model.state_dict().items() if n not in models.frozen_names)


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


def init_trackers(r: Run) -> None:
    """Accelerate's trackers on the main process: TensorBoard in <run>/tensorboard, Weights & Biases in <run>/wandb
    (project ``$WANDB_PROJECT`` or ``hd``, run name = the run dir's; ``WANDB_MODE=offline`` works offline)."""
    from hdcli.config import to_dict

    init = {"wandb": {"dir": str(r.run_dir), "name": r.run_dir.name, "config": to_dict(r.cfg)}}
    if "wandb" in r.cfg.train.all_trackers and os.environ.get("WANDB_MODE", None) == "":
        raise HDError("WANDB_MODE is set but empty", "unset it, or set it to online, offline or disabled")
    try:
        r.accelerator.init_trackers(os.environ.get("WANDB_PROJECT", "hd") if "wandb" in r.cfg.train.all_trackers
                                    else "tensorboard", init_kwargs=init)
    except Exception as e:  # noqa: BLE001 - e.g. wandb's UsageError: no API key on a machine that never logged in
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise HDError(f"--tracker {','.join(r.cfg.train.all_trackers)} could not start: {type(e).__name__}: {first}",
                      "for wandb: `wandb login`, or WANDB_MODE=offline (sync later with `wandb sync`)") from None


def reset_accelerate() -> None:
    """Accelerate keeps its settings in process-wide singletons; several trainings in one process (hd demo:
    pretrain -> distill -> finetune) need them cleared, else the second one fails."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
