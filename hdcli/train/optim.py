"""The optimiser's side of the loop: AdamW parameter groups, the lr schedule, run length (pure functions)."""

from __future__ import annotations

import math

import torch
from torch import nn

# ... and relative position bias tables (BEiT, FD: no decay on them; timm's relpos ViT does not name its own)
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token", "mask_token", "relative_position_bias_table")


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


def total_steps(*, epochs: int, steps: int | None, batches_per_epoch: int, accum_steps: int) -> int:
    """Optimiser steps of a run: ``steps`` when set, else epochs × batches per epoch / accumulation."""
    if steps is not None:
        return steps
    return max(1, epochs * batches_per_epoch // accum_steps)


def fused_ok(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for ``device`` (CUDA and, since torch 2.4, the CPU)."""
    return device.type in ("cuda", "cpu")


def build_adamw(groups: list[dict], oc, peak: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``groups`` with the ``[optim]`` section's betas/eps at lr ``peak`` (fused where the device
    has it); every group gets ``lr_scale`` 1 unless it carries its own (layer decay)."""
    opt = torch.optim.AdamW(groups, lr=peak, betas=tuple(oc.betas), eps=oc.eps,
                            fused=True if fused_ok(device) else None)
    for g in opt.param_groups:
        g.setdefault("lr_scale", 1.0)
    return opt


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set the lr of every group to ``lr`` × its ``lr_scale``."""
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
