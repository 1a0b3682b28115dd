"""hdcli.method.losses against hand computations."""

from __future__ import annotations

import pytest
import torch

from hdcli.method.losses import LOSSES, smooth_l1


def test_smooth_l1_by_hand_on_both_sides_of_beta():
    pred = torch.tensor([0.0, 0.0, 0.0, 0.0])
    target = torch.tensor([1.0, -1.5, 3.0, -4.0])  # |d| = 1, 1.5 (< β = 2: 0.5 d²/β), 3, 4 (≥ β: |d| − β/2)
    want = (0.25 + 0.5625 + 2.0 + 3.0) / 4
    assert float(smooth_l1(pred, target)) == pytest.approx(want)
    assert float(smooth_l1(pred, target, beta=1.0)) == pytest.approx((0.5 + 1.0 + 2.5 + 3.5) / 4)


def test_smooth_l1_is_computed_in_fp32_whatever_the_inputs():
    pred = torch.full((4, 8), 1.0, dtype=torch.bfloat16)
    target = torch.full((4, 8), 1.001)  # in bf16 the target would round to 1.0 and the loss to 0
    out = smooth_l1(pred, target)
    assert out.dtype == torch.float32 and float(out) == pytest.approx(0.5 * (1.001 - 1.0) ** 2 / 2, rel=1e-3)


def test_the_table_names_the_papers_loss():
    assert LOSSES["smooth_l1"] is smooth_l1
