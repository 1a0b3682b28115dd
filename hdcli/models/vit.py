"""Helpers over unmodified timm ViTs: hidden states entering blocks, token gather, q·kᵀ taps.

Nothing here forks timm: every helper calls timm's own modules (``patch_embed``, ``_pos_embed``,
``patch_drop``, ``norm_pre``, ``blocks``, ``norm``), so the attention stays on timm's fused SDPA
path. Only ``relations`` computes q·kᵀ explicitly, and only for the tokens it is given.

Token order everywhere: CLS first, then patches in ascending patch index (METHOD.md).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from hdcli.errors import HDError


def check_vit(model: nn.Module, who: str) -> None:
    """Raise HDError unless ``model`` is a timm ViT with one CLS token and standard qkv attention."""
    hint = "use a timm VisionTransformer (vit_*, deit_*, *_clip_*) with one class token and no register tokens"
    for attr in ("patch_embed", "_pos_embed", "norm_pre", "blocks", "norm"):
        if not hasattr(model, attr):
            raise HDError(f"{who} ({type(model).__name__}) is not a timm VisionTransformer (no {attr})", hint)
    if getattr(model, "cls_token", None) is None or getattr(model, "num_prefix_tokens", 1) != 1:
        raise HDError(f"{who} must have exactly one prefix token (CLS) and no register tokens", hint)
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if not (hasattr(blk, "norm1") and isinstance(getattr(attn, "qkv", None), nn.Linear)
                and hasattr(attn, "num_heads") and hasattr(attn, "head_dim")):
            raise HDError(f"{who} block {i} ({type(blk).__name__}) has no fused qkv attention", hint)


def check_student(model: nn.Module, img_size: int, who: str = "the student") -> None:
    """HDError unless ``img_size`` is a positive multiple of the model's patch size and the model drops no
    patches itself (timm's ``patch_drop_rate``: the method chooses the kept tokens)."""
    p = patch_size(model)[0]
    if img_size < p or img_size % p:
        raise HDError(f"--img-size {img_size} is not a positive multiple of {who}'s patch size {p}",
                      f"e.g. --img-size {p * max(1, round(img_size / p))}, or a smaller --patch-size")
    prob = getattr(getattr(model, "patch_drop", None), "prob", 0.0)
    if prob:
        raise HDError(f"{who} drops {prob:.0%} of its patches at random (patch_drop_rate={prob:g})",
                      "Hybrid Distill chooses the kept tokens itself: leave patch_drop_rate at 0 (drop_ratio sets "
                      "how many it keeps)")


def depth(model: nn.Module) -> int:
    return len(model.blocks)


def width(model: nn.Module) -> int:
    """Token width D (what ``forward_features`` returns per token)."""
    return int(model.embed_dim)


def num_heads(model: nn.Module, block: int = 0) -> int:
    return int(model.blocks[block].attn.num_heads)


def patch_size(model: nn.Module) -> tuple[int, int]:
    return tuple(int(p) for p in model.patch_embed.patch_size)


def check_blocks(model: nn.Module, blocks: Iterable[int], who: str, what: str = "block") -> tuple[int, ...]:
    """Block indices as a tuple; HDError naming the model's depth if one is out of range."""
    blocks = tuple(int(b) for b in blocks)
    n = depth(model)
    for b in blocks:
        if not 0 <= b < n:
            raise HDError(
                f"{what} {b} is out of range for {who}, which has {n} blocks (0..{n - 1})",
                "blocks count from 0: paper layer i is block i-1",
            )
    return blocks


def fit_grid(model: nn.Module, grid: tuple[int, int]) -> tuple[int, int]:
    """Make ``model`` accept an input whose token grid is ``grid``; return that input size (H, W).

    A /14 teacher for a /16 student at 224 px sees 196 px (METHOD.md "mismatched shapes"). The
    model's position embeddings are interpolated once here with timm's ``set_input_size`` (this
    changes ``model`` in place); ``dynamic_img_size`` models would also resample on the fly.
    """
    p = patch_size(model)
    size = (grid[0] * p[0], grid[1] * p[1])
    if model.patch_embed.img_size is not None and tuple(model.patch_embed.img_size) != size:
        model.set_input_size(img_size=size)
    return size


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Hidden state entering block 0: patch + position embedding, CLS first, ``norm_pre``.

    x: [B, 3, H, W] -> [B, 1+N, D]
    """
    x = model.patch_embed(x)  # [B, N, D] (or [B, h, w, D] for dynamic_img_size models)
    x = model._pos_embed(x)  # [B, 1+N, D] CLS + patches, each with its position embedding
    x = model.patch_drop(x)
    return model.norm_pre(x)


def gather_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """CLS followed by the kept patches. x: [B, 1+N, D], keep: [B, n] patch indices -> [B, 1+n, D]."""
    patches = x[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, n, D]
    return torch.cat([x[:, :1], patches], dim=1)


def embed_kept(model: nn.Module, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Student input: embed all patches, then gather CLS + kept tokens BEFORE any block (cost ∝ tokens).

    x: [B, 3, H, W], keep: [B, n] or None (all) -> [B, 1+n, D]. ``norm_pre`` is per token, so
    applying it after the gather gives the same values as before it.
    """
    x = model.patch_embed(x)
    x = model._pos_embed(x)  # [B, 1+N, D]
    if keep is not None:
        x = gather_tokens(x, keep)  # [B, 1+n, D]
    x = model.patch_drop(x)
    return model.norm_pre(x)


def relations(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Token relations R = q·kᵀ of ``block`` (paper Eq. 2), without the 1/√d_h scale.

    x: [B, T, D] hidden state entering the block (already restricted to the wanted tokens: norm1 and
    the projection act per token, so R over a gathered sequence equals R over the full one, indexed).
    Returns [B, H, T, T]. Only the q and k rows of the block's ``qkv`` weight are used.
    """
    attn = block.attn
    b, t, _ = x.shape
    h, dh = attn.num_heads, attn.head_dim
    a = block.norm1(x)  # [B, T, D]
    w = attn.qkv.weight[: 2 * h * dh]  # [2·H·dh, D] q and k rows
    bias = attn.qkv.bias[: 2 * h * dh] if attn.qkv.bias is not None else None
    qk = F.linear(a, w, bias).reshape(b, t, 2, h, dh).permute(2, 0, 3, 1, 4)  # [2, B, H, T, dh]
    q, k = qk.unbind(0)  # [B, H, T, dh] each
    q, k = attn.q_norm(q), attn.k_norm(k)
    return q @ k.transpose(-2, -1)  # [B, H, T, T]


def msa(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of the block's attention branch after ``proj``, before layer scale and the residual add.

    x: [B, T, D] hidden state entering the block -> [B, T, D] (paper MSA_m^i; timm's fused attention).
    """
    return block.attn(block.norm1(x))


def run_blocks(
    model: nn.Module,
    x: torch.Tensor,
    *,
    enter: Iterable[int] = (),
    leave: Iterable[int] = (),
    final: bool = False,
    checkpoint: bool = False,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor | None]:
    """Run ``model.blocks`` on x [B, T, D] only as far as needed and return the taps.

    enter: blocks whose entering hidden state is wanted; leave: blocks whose output is wanted;
    final: also run the remaining blocks and the final norm (``forward_features``).
    Returns (entering {i: [B,T,D]}, leaving {i: [B,T,D]}, features [B,T,D] or None). Blocks after the
    last one needed are never run: for ``enter={10}`` only blocks 0..9 run.
    """
    enter, leave = set(enter), set(leave)
    stop = max([*enter, *(b + 1 for b in leave), len(model.blocks) if final else 0])
    entering: dict[int, torch.Tensor] = {}
    leaving: dict[int, torch.Tensor] = {}
    for i in range(stop):
        if i in enter:
            entering[i] = x
        blk = model.blocks[i]
        if checkpoint:
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
        if i in leave:
            leaving[i] = x
    if stop in enter:
        entering[stop] = x
    return entering, leaving, (final_norm(model)(x) if final else None)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm that ends a model's token features: ``norm``, or ``fc_norm`` where timm moved it there
    (``global_pool="avg"``: ``norm`` is Identity and the real final norm is ``fc_norm``)."""
    norm, fc = model.norm, getattr(model, "fc_norm", None)
    if isinstance(norm, nn.Identity) and fc is not None and not isinstance(fc, nn.Identity):
        return fc
    return norm
