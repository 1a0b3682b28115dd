"""Hybrid Distill and its general form, as PyTorch modules (METHOD.md is the contract). In reading order:

- :mod:`~hdcli.method.names`: the option lists and the paper's blocks (torch-free; the config reads them);
- :mod:`~hdcli.method.masking`: keep sets: which patches the student sees (Eq. 4, Tab. 8);
- :mod:`~hdcli.method.norms`: how a teacher's feature target is normalised (LayerNorm, standardisation, PHI-S);
- :mod:`~hdcli.method.losses`: how a prediction is compared with a target (SmoothL1, β = 2);
- :mod:`~hdcli.method.heads`: what maps student tokens to a target's width (linear);
- :mod:`~hdcli.method.targets`: a ``Target``, the kinds of target, which tokens both sides compare;
- :mod:`~hdcli.method.teacher`: the frozen teachers and the teacher pass (keep set + targets, once per batch);
- :mod:`~hdcli.method.distiller`: ``Distiller``: teacher pass -> student pass -> loss;
- :mod:`~hdcli.method.signals`: per-target signals of a step (cosine, attention agreement, gradient shares);
- :mod:`~hdcli.method.hybrid`: ``HybridDistill`` (L = L_feat + α·L_rel) and the one builder from a config.

    from hdcli.method import HybridDistill
    hd = HybridDistill(student, mim_teacher, feat_teacher)       # the paper's default
    out = hd(images)             # images: float [B,3,H,W], ImageNet-normalised
    out.loss.backward()          # gradients reach hd.student and hd.heads only

Names are loaded on first use, so ``from hdcli.method.names import MASKING`` does not import torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "Distiller": "distiller", "DistillOutput": "distiller", "HybridDistill": "hybrid", "Target": "targets",
    "KINDS": "targets", "match_prefix": "targets", "Masking": "masking", "TeacherPass": "teacher",
    "TeacherTargets": "teacher", "paper_blocks": "names",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"hdcli.method.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'hdcli.method' has no attribute {name!r}")
