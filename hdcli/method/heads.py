"""Heads: what maps a student's tokens to a feature-like target's width.

- ``linear`` (the paper's, METHOD.md): ``nn.Linear(d_in, d_out)`` with bias, per token.
- ``mlp`` (AM-RADIO's adaptor MLP, ``radio/adaptor_mlp.py``; UNIC's projector): Linear(d_in → hidden), then
  ``layers − 1`` times LayerNorm → GELU → Linear, the last to d_out; per token. Defaults: hidden = 4·d_in
  (as a ViT block's MLP), 2 layers.
- ``block`` (DUNE's transformer projector, ``model/projector/tp.py``): one timm ViT block over the target's
  token sequence (its attention mixes the tokens), LayerScale 1e-4, then Linear(d_in → d_out).

A head's spec is a name or a table ``{kind = "mlp", hidden = 1024, layers = 2}`` (:class:`HeadSpec`). A new head
is a constructor ``(spec, d_in, d_out) -> nn.Module`` acting on [B, T, d_in], its entry in ``HEADS`` and its test
in tests/test_heads.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from torch import nn

from hdcli.errors import HDError, did_you_mean


@dataclass(frozen=True)
class HeadSpec:
    """A head: its ``kind`` (a key of ``HEADS``) and options (None: the kind's default)."""

    kind: str = "linear"
    hidden: int | None = None  # mlp: hidden width (default 4·d_in)
    layers: int | None = None  # mlp: linear layers (default 2)
    heads: int | None = None  # block: attention heads (default: d_in // 64, at least 1)
    mlp_ratio: float | None = None  # block: the block's MLP ratio (default 4)

    @classmethod
    def of(cls, spec) -> HeadSpec:
        """A name, a table or a HeadSpec -> HeadSpec (HDError naming an unknown kind or key)."""
        if isinstance(spec, HeadSpec):
            return spec
        if isinstance(spec, str):
            spec = {"kind": spec}
        if not isinstance(spec, dict):
            raise HDError(f"a head is a name or a table, got {spec!r}", 'e.g. head = "mlp" or {kind = "mlp", hidden = 1024}')
        keys = [f.name for f in fields(cls)]
        for k in spec:
            if k not in keys:
                raise HDError(f"unknown head option {k!r}", did_you_mean(k, keys))
        out = cls(**spec)
        if out.kind not in HEADS:
            raise HDError(f"unknown head kind {out.kind!r}", f"use one of: {', '.join(HEADS)}")
        for k in ("hidden", "layers", "heads"):
            v = getattr(out, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise HDError(f"head option {k} must be a positive integer, got {v!r}")
        if out.mlp_ratio is not None and not out.mlp_ratio > 0:
            raise HDError(f"head option mlp_ratio must be > 0, got {out.mlp_ratio!r}")
        return out


def _init(module: nn.Module) -> nn.Module:
    """timm's init for linear layers: truncated normal (std 0.02), zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def linear(spec: HeadSpec, d_in: int, d_out: int) -> nn.Linear:
    """The paper's head: ``nn.Linear(d_in, d_out)``."""
    return _init(nn.Linear(d_in, d_out))


def mlp(spec: HeadSpec, d_in: int, d_out: int) -> nn.Sequential:
    """Linear(d_in → hidden), then (layers − 1) × [LayerNorm → GELU → Linear], the last one to d_out."""
    hidden, layers = spec.hidden or 4 * d_in, spec.layers or 2
    mods: list[nn.Module] = [nn.Linear(d_in, hidden if layers > 1 else d_out)]
    for i in range(1, layers):
        mods += [nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, d_out if i == layers - 1 else hidden)]
    return _init(nn.Sequential(*mods))


class BlockHead(nn.Module):
    """One timm ViT block over the token sequence (LayerScale 1e-4, as DUNE's projector), then a linear map."""

    def __init__(self, spec: HeadSpec, d_in: int, d_out: int):
        super().__init__()
        from timm.models.vision_transformer import Block

        heads = spec.heads or max(1, d_in // 64)
        if d_in % heads:
            raise HDError(f"a block head of width {d_in} cannot have {heads} attention heads",
                          f"give heads = a divisor of {d_in}")
        self.block = Block(d_in, heads, mlp_ratio=spec.mlp_ratio or 4.0, qkv_bias=True, init_values=1e-4)
        self.proj = nn.Linear(d_in, d_out)
        _init(self)
        self.block.ls1.gamma.data.fill_(1e-4)  # timm's LayerScale init after the generic init
        self.block.ls2.gamma.data.fill_(1e-4)

    def forward(self, x):
        return self.proj(self.block(x))


HEADS: dict[str, Callable[[HeadSpec, int, int], nn.Module]] = {"linear": linear, "mlp": mlp, "block": BlockHead}


def build(spec, d_in: int, d_out: int) -> nn.Module:
    """The head of ``spec`` (a name, a table or a HeadSpec) from d_in to d_out channels."""
    spec = HeadSpec.of(spec)
    return HEADS[spec.kind](spec, d_in, d_out)
