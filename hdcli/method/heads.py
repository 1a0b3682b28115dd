"""Heads: what maps a student's tokens to a feature-like target's width.

- ``linear`` (the paper's, METHOD.md): ``nn.Linear(d_in, d_out)`` with bias, per token.
- ``mlp`` (AM-RADIO's adaptor MLP, ``radio/adaptor_mlp.py``; UNIC's projector): Linear(d_in → hidden), then
  ``layers − 1`` times LayerNorm → GELU → Linear, the last to d_out; per token. Defaults: hidden = 4·d_in
  (as a ViT block's MLP), 2 layers.
- ``block`` (DUNE's transformer projector, ``model/projector/tp.py``): one timm ViT block over the target's
  token sequence (its attention mixes the tokens), LayerScale 1e-4, then Linear(d_in → d_out).
- ``identity``: none (the paper's Fig. 1 "no decoder": the student's features are compared as they are; d_in must
  equal d_out).
- ``decoder`` (the asymmetric decoders of paper Sec. 2.2-2.3, Fig. 1-3): Linear(d_in → dim) where dim differs, then
  ``blocks`` plain timm ViT blocks (width ``dim``, ``heads`` heads), a LayerNorm, and Linear(dim → d_out), as MAE's
  decoder ends (``decoder_norm``, ``decoder_pred``). The ``[distill] decoder`` option writes these heads
  (:func:`decoder_spec`); ``hd analyze`` reads a decoder's blocks after the encoder's.

A head's spec is a name or a table ``{kind = "mlp", hidden = 1024, layers = 2}`` (:class:`HeadSpec`). A new head
is a constructor ``(spec, d_in, d_out) -> nn.Module`` acting on [B, T, d_in], its entry in ``HEADS`` and its test
in tests/test_heads.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from torch import nn

from hdcli.errors import HDError, did_you_mean


@dataclass(frozen=True)
class HeadSpec:
    """A head: its ``kind`` (a key of ``HEADS``) and options (None: the kind's default)."""

    kind: str = "linear"
    hidden: int | None = None  # mlp: hidden width (default 4·d_in)
    layers: int | None = None  # mlp: linear layers (default 2)
    heads: int | None = None  # block, decoder: attention heads (default: width // 64, at least 1)
    mlp_ratio: float | None = None  # block, decoder: the blocks' MLP ratio (default 4)
    blocks: int | None = None  # decoder: transformer blocks (default 1)
    dim: int | None = None  # decoder: the blocks' width (default d_in)

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
        for k in ("hidden", "layers", "heads", "blocks", "dim"):
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


def identity(spec: HeadSpec, d_in: int, d_out: int) -> nn.Identity:
    """No head: the student's tokens are the prediction (equal widths needed)."""
    if d_in != d_out:
        raise HDError(f"no head (decoder = \"none\") needs the student's width {d_in} to equal the target's {d_out}",
                      "use decoder = \"linear\", or a student of the teacher's width")
    return nn.Identity()


class Decoder(nn.Module):
    """An asymmetric decoder after the student encoder (paper Sec. 2.2): ``embed`` (Linear d_in → dim, or none
    where dim = d_in), ``blocks`` timm ViT blocks, ``norm``, ``proj`` (Linear dim → d_out). Its blocks are plain
    pre-norm timm ``Block``s, so ``hd analyze`` measures their attention as an encoder's."""

    def __init__(self, spec: HeadSpec, d_in: int, d_out: int):
        super().__init__()
        from timm.models.vision_transformer import Block

        dim = spec.dim or d_in
        heads = spec.heads or max(1, dim // 64)
        if dim % heads:
            raise HDError(f"a decoder of width {dim} cannot have {heads} attention heads", f"give heads = a divisor of {dim}")
        if int(dim * (spec.mlp_ratio or 4.0)) < 1:
            raise HDError(f"decoder mlp_ratio {spec.mlp_ratio} leaves its MLP no hidden unit at width {dim}",
                          "use mlp_ratio = 4 (a ViT block's) or leave it out")
        self.spec, self.d_in, self.d_out = spec, d_in, d_out
        self.embed = nn.Linear(d_in, dim) if dim != d_in else nn.Identity()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=spec.mlp_ratio or 4.0, qkv_bias=True)
                                    for _ in range(spec.blocks or 1))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, d_out)
        _init(self)

    def forward(self, x):
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x))


DECODER_CONFIG = "config.json"  # beside the decoder's model.safetensors in <student>/decoder/<target key>/


def save_decoder(decoder: Decoder, out: Path) -> None:
    """Write a decoder for analysis (``hd analyze`` reads it after the encoder): ``model.safetensors`` + its spec."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}, str(out / "model.safetensors"))
    spec = {k: v for k, v in asdict(decoder.spec).items() if v is not None}
    (out / DECODER_CONFIG).write_text(json.dumps({"spec": spec, "d_in": decoder.d_in, "d_out": decoder.d_out}) + "\n")


def load_decoder(d: Path) -> Decoder:
    """A decoder written by :func:`save_decoder`, in eval mode (HDError naming what is missing or wrong)."""
    from safetensors.torch import load_file

    try:
        cfg = json.loads((d / DECODER_CONFIG).read_text())
        decoder = Decoder(HeadSpec.of(cfg["spec"]), int(cfg["d_in"]), int(cfg["d_out"]))
        decoder.load_state_dict(load_file(str(d / "model.safetensors")))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise HDError(f"cannot read the decoder in {d}: {str(e).splitlines()[0]}",
                      "re-export the run (its decoder is written beside the student)") from None
    return decoder.eval()


def decoders_of(student_dir: Path) -> dict[str, Path]:
    """The decoders exported beside a student: target key -> directory (empty for a run without one)."""
    root = Path(student_dir) / "decoder"
    return {d.name: d for d in sorted(root.iterdir()) if (d / DECODER_CONFIG).is_file()} if root.is_dir() else {}


HEADS: dict[str, Callable[[HeadSpec, int, int], nn.Module]] = {
    "linear": linear, "mlp": mlp, "block": BlockHead, "identity": identity, "decoder": Decoder}

# the [distill] decoder option's names -> head kinds (paper Fig. 1: no decoder, a linear projection, attention layers)
DECODERS = {"none": "identity", "linear": "linear"}


def decoder_spec(value) -> HeadSpec:
    """``[distill] decoder`` as the head of the final-feature targets: ``"none"`` (identity), ``"linear"`` (the
    paper's head) or a table ``{blocks = k, dim = ..., heads = ..., mlp_ratio = ...}`` (a :class:`Decoder`)."""
    if isinstance(value, str):
        if value not in DECODERS:
            raise HDError(f"unknown decoder {value!r}", did_you_mean(value, DECODERS) or
                          "use \"none\", \"linear\" or a table {blocks = 2, dim = 512, heads = 16}")
        return HeadSpec(DECODERS[value])
    if not isinstance(value, dict):
        raise HDError(f"distill.decoder is a name or a table, got {value!r}", "e.g. decoder = {blocks = 2}")
    allowed = ("blocks", "dim", "heads", "mlp_ratio")
    for k in value:
        if k not in allowed:
            raise HDError(f"unknown decoder option {k!r}", did_you_mean(k, allowed) or f"use {', '.join(allowed)}")
    return HeadSpec.of({"kind": "decoder", **value})


def build(spec, d_in: int, d_out: int) -> nn.Module:
    """The head of ``spec`` (a name, a table or a HeadSpec) from d_in to d_out channels."""
    spec = HeadSpec.of(spec)
    return HEADS[spec.kind](spec, d_in, d_out)
