"""Heads: what maps a student's tokens to a feature-like target's width (METHOD.md: a linear layer with bias).

``HEADS`` names them for the config; a new head is a constructor here ``(d_in, d_out) -> nn.Module`` acting per
token on [.., d_in], its entry in ``HEADS`` and its test in tests/test_heads.py.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def linear(d_in: int, d_out: int) -> nn.Linear:
    """The paper's head: ``nn.Linear(d_in, d_out)`` with timm's init (trunc-normal std 0.02, zero bias)."""
    head = nn.Linear(d_in, d_out)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


HEADS: dict[str, Callable[[int, int], nn.Module]] = {"linear": linear}
