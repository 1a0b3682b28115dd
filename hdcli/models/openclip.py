"""The one place that knows OpenCLIP's vision towers (the optional extra ``hdcli[openclip]``): ``openclip:ARCH:FILE``,
an OpenCLIP architecture and a local checkpoint of it, as a frozen teacher.

- A ViT tower (``open_clip.transformer.VisionTransformer`` without attention pooling) in timm's ViT layout
  (:class:`hdcli.models.adapted.Adapted`): ``conv1`` patches, class + positional embedding, ``ln_pre``, the
  residual attention blocks (q and k are the first two thirds of ``nn.MultiheadAttention``'s ``in_proj``), and
  ``ln_post`` on every token (unless the tower normalises after pooling): features and relations.
- A timm tower (``TimmModel``): its timm trunk, a ViT as such, anything else features only.
- Anything else (the ModifiedResNet of the RN* CLIPs) is refused in one line.

The input mean/std are the tower's own (``preprocess_cfg``, which OpenCLIP sets from the architecture's config).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hdcli.errors import HDError
from hdcli.models.adapted import Adapted, Attention, Block, PatchEmbed

EXTRA = "pip install 'hdcli[openclip]' (open-clip-torch 3.x)"


def open_clip():
    try:
        import open_clip as oc
    except ImportError:
        raise HDError("openclip: teachers need OpenCLIP, which is not installed", EXTRA) from None
    return oc


class Rows(nn.Module):
    """Rows ``[start, stop)`` of a fused projection (``in_proj_weight``/``in_proj_bias``) as a linear map."""

    def __init__(self, attn: nn.MultiheadAttention, part: int):
        super().__init__()
        self.attn, self.part = attn, part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.attn.embed_dim
        rows = slice(self.part * d, (self.part + 1) * d)
        bias = self.attn.in_proj_bias[rows] if self.attn.in_proj_bias is not None else None
        return F.linear(x, self.attn.in_proj_weight[rows], bias)


def load(arch: str, checkpoint: str) -> nn.Module:
    """The vision tower of OpenCLIP's ``arch`` with the weights of ``checkpoint``, frozen, in eval mode."""
    oc = open_clip()
    if arch not in oc.list_models():
        from hdcli.errors import did_you_mean

        raise HDError(f"OpenCLIP has no architecture {arch!r}", did_you_mean(arch, oc.list_models()) or
                      "`python -c 'import open_clip; print(open_clip.list_models())'` lists them")
    try:
        model = oc.create_model(arch, pretrained=checkpoint, weights_only=True)
    except Exception as e:  # unreadable files (pickle), other architectures (OpenCLIP asserts on shapes), ...
        why = (str(e).splitlines() or [type(e).__name__])[0][:200] or type(e).__name__
        raise HDError(f"cannot load OpenCLIP {arch} from {checkpoint}: {why}",
                      "give the checkpoint file of this architecture (open_clip_pytorch_model.bin or .safetensors)") from None
    return adapt(model.visual.eval().requires_grad_(False))


def adapt(visual: nn.Module) -> nn.Module:
    """An OpenCLIP vision tower in timm's layout (ViT), its timm trunk, or features only (a timm non-ViT)."""
    from hdcli.models.features import as_teacher

    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        raise HDError(f"the OpenCLIP tower {type(visual).__name__} states no input mean/std",
                      "pass --teacher-mean and --teacher-std")
    kind = type(visual).__name__
    if kind == "TimmModel":
        trunk = visual.trunk
        trunk.pretrained_cfg = {**(getattr(trunk, "pretrained_cfg", None) or {}), "mean": tuple(mean), "std": tuple(std)}
        return as_teacher(trunk)
    if kind != "VisionTransformer" or getattr(visual, "attn_pool", None) is not None:
        raise HDError(f"hd reads OpenCLIP's ViT and timm towers, not its {kind}", "use a ViT-* or timm-* OpenCLIP model")
    size = tuple(visual.image_size) if isinstance(visual.image_size, tuple | list) else (visual.image_size,) * 2

    def pos_embed(x):
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)

    def attn_call(attn, x, rope):
        return attn(x, x, x, need_weights=False)[0]

    def block_call(block, x, rope):
        return block(x)

    blocks = []
    for rb in visual.transformer.resblocks:
        a = rb.attn
        att = Attention(a, Rows(a, 0), Rows(a, 1), a.num_heads, a.head_dim, attn_call)
        blocks.append(Block(rb, rb.ln_1, att, block_call))
    norm = nn.Identity() if getattr(visual, "final_ln_after_pool", False) else visual.ln_post
    return Adapted(visual, family="vit", patch_embed=PatchEmbed(visual.conv1, size), pos_embed=pos_embed,
                   blocks=blocks, norm=norm, norm_pre=visual.ln_pre, cls=True, num_prefix=1,
                   embed_dim=visual.conv1.out_channels, mean=mean, std=std, kind=f"OpenCLIP {kind}")
