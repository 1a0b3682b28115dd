"""The loss pieces of the separately written reference implementations (tests/test_method.py, test_families.py),
written out from METHOD.md: LayerNorm without affine, SmoothL1, and the relative error the checks compare by."""

from __future__ import annotations

import torch


def ref_ln(f):
    mu = f.mean(-1, keepdim=True)
    var = ((f - mu) ** 2).mean(-1, keepdim=True)
    return (f - mu) / torch.sqrt(var + 1e-6)


def ref_smooth_l1(a, b, beta=2.0):
    d = (a - b).abs()
    return torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta).mean()


def rel_err(a, b):
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def ref_weigh(targets, parts):
    """(loss_feat, loss_rel): the targets' weighted parts summed by kind (relations apart), METHOD.md "Loss"."""
    feat = sum((t.weight * parts[t.name] for t in targets if t.kind != "relations"), 0.0)
    rel = sum((t.weight * parts[t.name] for t in targets if t.kind == "relations"), 0.0)
    return feat, rel
