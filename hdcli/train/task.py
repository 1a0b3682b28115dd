"""The interface between the one training loop (:mod:`hdcli.train.engine`) and what it trains."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hdcli.rundir import STUDENT
from hdcli.train.optim import param_groups_weight_decay


@dataclass
class Member:
    """An independently optimised part of ``Task.model`` (one student of several): its own AdamW with ``optim``
    (an ``OptimConfig``), lr schedule, gradient clipping and non-finite guard. Its records go to
    ``<run>/<dir>/metrics.jsonl`` (the loss dict's ``<name>/...`` entries without the prefix, plus the shared
    ones) and its export to ``<run>/<dir>/<Task.export_dir>`` (``Task.export_member``)."""

    name: str
    module: nn.Module
    optim: Any
    dir: str
    config: Any = None  # written to <run>/<dir>/config.toml: the config of the single run the member equals


class Task:
    """What the engine trains. Subclass it (distill, finetune, pretrain) and fill in:

    - ``model``: one ``nn.Module`` holding every trainable parameter (student + heads). The engine
      moves it to the device, wraps it (DDP, autocast, compile) and hands the wrapped module back to
      ``loss``; call that one so DDP syncs gradients.
    - ``frozen``: submodules of ``model`` that are used but never trained (a linear probe's backbone): DDP
      neither broadcasts nor reduces them, checkpoints never hold them, and they stay in eval mode. (Modules
      kept outside ``model``'s tree, as the distiller keeps its teachers, need nothing from the engine.)
    - ``train_loader(rank=, world_size=, seed=)``: an iterable of batches for this rank with
      ``len()`` = batches per epoch (the same on every rank). Batches stay on the host (uint8 images);
      the engine moves tensors to the device. If the loader has ``set_epoch(epoch)`` it is called
      before each epoch, and ``close()`` when the run ends (worker processes); data order and
      augmentation must depend only on (seed, epoch, rank).
    - ``loss(model, batch, detail=False)``: a dict of scalar tensors with key ``"loss"`` (what is minimised);
      every entry is averaged and logged. ``detail`` is True on the steps whose record is written, when the
      task may add costlier entries (per-target signals).
    - ``export(model, out_dir)``: write the result (unwrapped ``model``) into the empty ``out_dir``;
      the engine renames it to ``<run>/<export_dir>`` afterwards (atomic).
    - optional ``param_groups(model, weight_decay)`` (e.g. timm's layer decay; groups may carry
      ``lr_scale``); ``evaluate(model, accelerator, epoch, step) -> dict | None`` (on all ranks, after the
      steps ``eval_at`` chooses: by default each finished epoch, ``epoch`` its 0-based index; the returned
      numbers join that step's record); ``begin(model, accelerator, start) -> dict | None`` (before the
      first step of a segment: numbers recorded at step ``start``, e.g. an initial evaluation); attributes
      ``log_keys``, ``export_dir`` (default ``student``) and ``find_unused_parameters`` (DDP);
    - optional ``members``: independently optimised parts of ``model`` (several students), each with its own
      AdamW, records and export (:class:`Member`; ``export_member(model, name, out_dir)`` writes one).
    """

    model: nn.Module
    frozen: Sequence[nn.Module] = ()
    log_keys: Sequence[str] = ("loss",)  # loss-dict entries shown in the progress bar and log lines
    export_dir: str = STUDENT
    find_unused_parameters: bool = False  # DDP: set when some trainable parameters get no gradient
    members: Sequence[Member] = ()  # several independently optimised parts (students); () = the model as one

    def train_loader(self, *, rank: int, world_size: int, seed: int) -> Iterable:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, *, detail: bool = False) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def export(self, model: nn.Module, out_dir: Path) -> None:
        raise NotImplementedError

    def export_member(self, model: nn.Module, name: str, out_dir: Path) -> None:
        raise NotImplementedError

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        return param_groups_weight_decay(model, weight_decay)

    def eval_at(self, done: int, *, n_steps: int, epoch_end: bool) -> bool:
        """Whether to evaluate after optimiser step ``done`` (1-based); default: after each finished epoch when
        the task has an ``evaluate``."""
        return epoch_end and type(self).evaluate is not Task.evaluate

    def evaluate(self, model: nn.Module, accelerator, epoch: int, step: int) -> dict[str, float] | None:
        return None

    def begin(self, model: nn.Module, accelerator, start: int) -> dict[str, float] | None:
        return None

    def close(self) -> None:
        """Release what the task holds beyond the training loader (e.g. an eval loader's workers); called once
        when the run ends, however it ends."""

