"""hdcli.method.heads: shapes, init, gradients."""

from __future__ import annotations

import torch

from hdcli.method.heads import HEADS, linear


def test_linear_head_maps_widths_with_timms_init():
    torch.manual_seed(0)
    head = linear(48, 64)
    assert (head.in_features, head.out_features) == (48, 64)
    assert torch.equal(head.bias, torch.zeros(64))
    assert 0.018 < float(head.weight.detach().std()) < 0.022  # (truncated) normal, std 0.02


def test_a_head_acts_per_token_and_passes_gradients():
    head = HEADS["linear"](8, 4)
    x = torch.randn(2, 5, 8, requires_grad=True)
    y = head(x)
    assert y.shape == (2, 5, 4)
    torch.testing.assert_close(y[1, 3], head(x[1, 3]))
    y.sum().backward()
    assert x.grad is not None and head.weight.grad is not None
