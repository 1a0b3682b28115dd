"""hdcli.method.heads: shapes, init, gradients, options."""

from __future__ import annotations

import pytest
import torch

from hdcli.errors import HDError
from hdcli.method.heads import HeadSpec, build


def test_linear_head_maps_widths_with_timms_init():
    torch.manual_seed(0)
    head = build("linear", 48, 64)
    assert (head.in_features, head.out_features) == (48, 64)
    assert torch.equal(head.bias, torch.zeros(64))
    assert 0.018 < float(head.weight.detach().std()) < 0.022  # (truncated) normal, std 0.02


@pytest.mark.parametrize("spec", ["linear", "mlp", {"kind": "mlp", "hidden": 16, "layers": 3},
                                  {"kind": "block", "heads": 2}])
def test_every_head_maps_tokens_to_the_target_width_and_passes_gradients(spec):
    head = build(spec, 8, 4)
    x = torch.randn(2, 5, 8, requires_grad=True)
    y = head(x)
    assert y.shape == (2, 5, 4)
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in head.parameters())


def test_the_mlp_head_is_linear_then_norm_gelu_linear_per_layer():
    head = build({"kind": "mlp", "hidden": 16, "layers": 3}, 8, 4)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "LayerNorm", "GELU", "Linear", "LayerNorm", "GELU", "Linear"]
    assert (head[0].in_features, head[0].out_features, head[-1].out_features) == (8, 16, 4)
    assert build("mlp", 8, 4)[0].out_features == 32  # hidden 4·d_in by default
    x = torch.randn(1, 3, 8)
    torch.testing.assert_close(head(x)[0, 1], head(x[:, 1:2])[0, 0])  # per token


def test_the_block_head_mixes_tokens_and_starts_near_a_linear_map():
    head = build({"kind": "block", "heads": 2}, 8, 4)
    assert float(head.block.ls1.gamma.abs().max()) == pytest.approx(1e-4)  # LayerScale 1e-4, as DUNE
    head.block.ls1.gamma.data.fill_(1.0)  # trained away from the start: the attention shows
    x = torch.randn(1, 3, 8)
    y = head(x)
    x2 = x.clone()
    x2[0, 2, 0] += 10.0  # one channel (a shift of all of them is what the block's LayerNorm removes)
    assert not torch.allclose(head(x2)[0, 0], y[0, 0])  # attention: token 0 sees token 2


@pytest.mark.parametrize("spec, message", [("mlp3", "unknown head kind 'mlp3'"),
                                           ({"kind": "mlp", "hiden": 3}, "unknown head option 'hiden'"),
                                           ({"kind": "mlp", "layers": 0}, "positive integer")])
def test_a_bad_head_is_one_line(spec, message):
    with pytest.raises(HDError, match=message):
        HeadSpec.of(spec)
