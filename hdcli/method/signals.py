"""Per-target signals of a distillation step (pure functions on the step's own tensors).

Read on logged steps only (``--log-every``): they tell which teacher drives the student and whether
each target is being matched, e.g. a teacher whose feature scale dominates the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


def cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over tokens between the student head's output and the target. [.., D] -> []."""
    return F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


def attention_agreement(r_student: torch.Tensor, r_teacher: torch.Tensor, scale_student: float,
                        scale_teacher: float) -> torch.Tensor:
    """How much the attention of student and teacher overlap, in [0, 1] (1: identical rows).

    r_*: relations q·kᵀ [B, H, T, T] over the same tokens; attention = softmax(r·scale) per row (the
    attention's own scale, dh^-1/2). Returns the mean over rows of Σ_j min(p_ij, q_ij) (1 − total variation).
    """
    p = (r_student.float() * scale_student).softmax(dim=-1)
    q = (r_teacher.float() * scale_teacher).softmax(dim=-1)
    return torch.minimum(p, q).sum(dim=-1).mean()


def grad_shares(losses: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor],
                scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Each (weighted) loss's share of the gradient norm at ``params``: ‖∇_θ L_t‖ / Σ_u ‖∇_θ L_u‖ (sums to 1).

    The graph is kept (``retain_graph``) for the step's own backward; nothing is written to ``.grad``.
    A loss that does not reach ``params`` has share 0; if none does, every share is 0. ``scale``: the losses are
    multiplied by it first (fp16 mixed precision: the gradient scaler's scale, so that small fp16 gradients do not
    flush to zero as the step's own backward's would not); the shares do not depend on it.
    """
    params = [p for p in params if p.requires_grad]
    norms = {}
    for name, loss in losses.items():
        if not loss.requires_grad:
            norms[name] = loss.new_zeros((), dtype=torch.float32)
            continue
        grads = torch.autograd.grad(loss * scale, params, retain_graph=True, allow_unused=True)
        sq = [g.float().pow(2).sum() for g in grads if g is not None]
        norms[name] = torch.stack(sq).sum().sqrt() if sq else loss.new_zeros((), dtype=torch.float32)
    total = sum(norms.values()) if norms else None
    if total is None:
        return {}
    return {name: torch.where(total > 0, n / total.clamp_min(1e-30), torch.zeros_like(n)) for name, n in norms.items()}
