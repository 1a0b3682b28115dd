"""The one place that knows timm's model internals: embeddings, token gather, blocks, q·kᵀ taps, final norm.

Three timm families are supported, students and teachers alike (docs/teachers.md lists the tags):

- ``VisionTransformer`` (``vit_*``, ``deit_*``, ``*_clip_*``, ``*_dinov2``, ``*_siglip_*``, ``aimv2_*``): absolute
  position embeddings; 0 or 1 class token, then 0+ register tokens; ``Block`` (pre-norm) or ``ResPostBlock``.
- ``Eva`` (``eva02_*``, ``*_dinov3``, ``vit_pe_*``): RoPE applied to q and k of the patch tokens inside attention
  (``_pos_embed`` returns it), optional absolute embeddings, CLS + storage tokens, fused or separate q/k/v
  projections with their own biases.
- ``VisionTransformerRelPos`` (``vit_relpos_*``, ``vit_srelpos_*``; FD's student, paper Sec. 2.2): no absolute
  position embedding; a relative position bias added to the attention logits, per block or one shared by all
  blocks (``shared_rel_pos``, FD's); 0 or 1 class token.

Nothing here forks timm: every helper calls timm's own modules (``patch_embed``, ``_pos_embed``, ``norm_pre``,
``blocks``, ``norm``), so attention stays on timm's fused SDPA path. Only ``relations`` computes q·kᵀ explicitly,
from the block's own projections, q/k norms and RoPE, and only for the tokens it is given.

Token order everywhere: the model's prefix tokens (CLS first, then registers), then patches in ascending patch
index (METHOD.md). ``rope`` is the positional input a family's blocks take on each forward: Eva's rotary embedding
of the patch tokens ([N, E] for all patches, [B, 1, n, E] once gathered to kept patches, their original grid
positions), or a RelPos model's shared relative position bias ([1, H, T, T], [B, H, T', T'] once gathered).
Relations (q·kᵀ) never include a relative position bias; attention maps (``attention_logits``) do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from hdcli.errors import HDError

SUPPORTED = ("timm VisionTransformer (vit_*, deit_*, *_clip_*, *_dinov2, *_siglip_*, aimv2_*), timm Eva "
             "(eva02_*, *_dinov3, vit_pe_*) or timm VisionTransformerRelPos (vit_relpos_*, vit_srelpos_*)")
_PRE_NORM_BLOCKS = ("Block", "EvaBlock", "RelPosBlock")  # attention input = norm1(x)
_POST_NORM_BLOCKS = ("ResPostBlock", "EvaBlockPostNorm", "ResPostRelPosBlock")  # input = x, norm1 after attention
_QK_ATTENTION = ("Attention", "EvaAttention", "AttentionRope", "RelPosAttention")  # q and k recomputable here
_REL_POS_BLOCKS = ("RelPosBlock", "ResPostRelPosBlock")  # take ``shared_rel_pos``, add a bias to the logits


def family(model: nn.Module) -> str:
    """``"vit"`` (timm VisionTransformer and subclasses), ``"eva"`` (timm Eva), ``"relpos"`` (timm
    VisionTransformerRelPos), or ``""`` for anything else."""
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    adapted = getattr(model, "hd_family", "")  # another library's model in timm's layout (models.adapted, .features)
    if adapted:
        return adapted
    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, Eva):
        return "eva"
    if isinstance(model, VisionTransformerRelPos):
        return "relpos"
    return ""


def check_vit(model: nn.Module, who: str) -> None:
    """Raise HDError unless ``model`` is of a supported family (:data:`SUPPORTED`) with a usable layout."""
    kind = family(model)
    if not kind:
        raise HDError(f"{who} ({type(model).__name__}) is not a supported model family", f"use a {SUPPORTED}")
    needs = {"relpos": ("patch_embed", "blocks", "norm"), "features": ("tokens", "blocks", "norm")}.get(
        kind, ("patch_embed", "_pos_embed", "norm_pre", "blocks", "norm"))
    for attr in needs:
        if not hasattr(model, attr):
            raise HDError(f"{who} ({type(model).__name__}) has no {attr}", f"use a {SUPPORTED}")
    if getattr(model, "rope_mixed", False):
        raise HDError(f"{who} uses depth-dependent ('mixed') RoPE, which hd cannot gather per kept token",
                      "use an axial-RoPE model (eva02_*, *_dinov3, vit_pe_*) or one with absolute position embeddings")


def gathers_tokens(model: nn.Module) -> bool:
    """Whether the model can run on a subset of its patches (a keep set): not a RelPos model with a bias per block
    (each block adds its full-grid bias itself); a shared bias is gathered with the tokens (``embed_kept``)."""
    return family(model) != "relpos" or getattr(model, "shared_rel_pos", None) is not None or not any(
        getattr(b.attn, "rel_pos", None) is not None for b in model.blocks)


def check_gathers_tokens(model: nn.Module, who: str) -> None:
    """HDError unless ``model`` can run on kept tokens only (:func:`gathers_tokens`)."""
    if not gathers_tokens(model):
        raise HDError(f"{who} ({type(model).__name__}) adds a relative position bias of its whole grid in every block, "
                      "so it cannot see only the kept tokens",
                      "use a shared bias (student.kwargs shared_rel_pos = true, FD's) or masking = 'none'")


def exposes_qk(block: nn.Module) -> bool:
    """Whether ``relations``/``msa`` can read this block's attention (its q·kᵀ exactly as it computes them)."""
    attn = getattr(block, "attn", None)
    return (type(block).__name__ in _PRE_NORM_BLOCKS + _POST_NORM_BLOCKS and type(attn).__name__ in _QK_ATTENTION
            and hasattr(attn, "num_heads") and hasattr(attn, "head_dim")
            and (isinstance(getattr(attn, "qkv", None), nn.Linear) or hasattr(attn, "q_proj")))


def check_attention(model: nn.Module, blocks: Iterable[int], who: str, what: str) -> None:
    """HDError unless every block of ``blocks`` exposes q·kᵀ (``exposes_qk``): relations, msa and attention maps."""
    for i in blocks:
        blk = model.blocks[i]
        if not exposes_qk(blk):
            raise HDError(f"{what} at block {i} of {who}: its {type(blk).__name__} "
                          f"({type(getattr(blk, 'attn', None)).__name__}) cannot expose q·kᵀ",
                          "take features from this model instead, or relations from a "
                          "VisionTransformer/Eva with standard attention blocks")


def num_prefix(model: nn.Module) -> int:
    """Prefix tokens before the patches: class token (if any) + register/storage tokens."""
    return int(getattr(model, "num_prefix_tokens", 1))


def has_cls(model: nn.Module) -> bool:
    return getattr(model, "cls_token", None) is not None


def prefix_roles(model: nn.Module) -> tuple[str, ...]:
    """The role of each prefix token in order: ``("cls", "reg", "reg", "reg", "reg")`` for DINOv2-reg/DINOv3,
    ``("cls",)`` for MAE/CLIP/DeiT, ``()`` for SigLIP and AIMv2 (no class token)."""
    cls = has_cls(model)
    return ("cls",) * cls + ("reg",) * (num_prefix(model) - cls)


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


def features_only(model: nn.Module) -> bool:
    """Whether the model gives final features only (``hdcli.models.features``: no blocks, no q·kᵀ)."""
    return family(model) == "features"


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model's input is cast to: its parameters'."""
    return next(iter(model.parameters()), torch.empty(0)).dtype


def fit_grid(model: nn.Module, grid: tuple[int, int]) -> tuple[int, int]:
    """Make ``model`` accept an input whose token grid is ``grid``; return that input size (H, W).

    A /14 teacher for a /16 student at 224 px sees 196 px (METHOD.md "mismatched shapes"). The
    model's position embeddings are interpolated once here with timm's ``set_input_size`` (this
    changes ``model`` in place); ``dynamic_img_size`` models would also resample on the fly.
    """
    if features_only(model):  # it sees its own input size; its map is resampled to the grid
        model.grid = tuple(grid)
        return tuple(model.img_size)
    p = patch_size(model)
    size = (grid[0] * p[0], grid[1] * p[1])
    if model.patch_embed.img_size is not None and tuple(model.patch_embed.img_size) != size:
        model.set_input_size(img_size=size)
    return size


def embed(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden state entering block 0 and the patches' RoPE: patch + position embedding, prefix tokens first,
    ``norm_pre``.

    x: [B, 3, H, W] -> ([B, P+N, D], rope [N, E] or None)
    """
    return embed_kept(model, x, None)


def _takes_all(prefix: int, take: Sequence[int] | None) -> bool:
    return take is None or tuple(take) == tuple(range(prefix))


def gather_tokens(x: torch.Tensor, keep: torch.Tensor, prefix: int = 1,
                  take: Sequence[int] | None = None) -> torch.Tensor:
    """Prefix tokens followed by the kept patches.

    x: [B, P+N, D] with ``prefix`` = P, keep: [B, n] patch indices -> [B, P'+n, D]; ``take`` (default: all P)
    picks which prefix tokens stay, in the given order (e.g. ``(0,)``: CLS only, registers dropped). Taking all
    of them is a plain slice.
    """
    patches = x[:, prefix:].gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, n, D]
    return torch.cat([x[:, :prefix] if _takes_all(prefix, take) else x[:, list(take)], patches], dim=1)


def select_prefix(x: torch.Tensor, prefix: int, take: Sequence[int] | None) -> torch.Tensor:
    """Keep the prefix tokens ``take`` (None: all) of x [B, P+n, D] and every patch token after them."""
    if _takes_all(prefix, take):
        return x
    return torch.cat([x[:, list(take)], x[:, prefix:]], dim=1)


def gather_rope(rope: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor | None:
    """The RoPE rows of the kept patches (their original grid positions). rope [N, E], keep [B, n] -> [B, 1, n, E]
    (the head axis broadcast, as timm's own patch dropout does). A relative position bias (4-D) is returned as it
    is: what reads gathered tokens (``relations``, per-token kinds) never uses it."""
    if rope is None or keep is None or rope.dim() == 4:
        return rope
    return rope[keep].unsqueeze(1)


def gather_bias(bias: torch.Tensor, keep: torch.Tensor, prefix: int) -> torch.Tensor:
    """A relative position bias [1, H, P+N, P+N] restricted to the prefix tokens and the kept patches ``keep``
    [B, n] (rows and columns): [B, H, P+n, P+n]."""
    b = keep.shape[0]
    idx = torch.cat([torch.arange(prefix, device=keep.device).expand(b, prefix), keep + prefix], dim=1)  # [B, T']
    full = bias.expand(b, -1, -1, -1)
    h, t, n = full.shape[1], full.shape[-1], idx.shape[1]
    rows = full.gather(2, idx[:, None, :, None].expand(b, h, n, t))
    return rows.gather(3, idx[:, None, None, :].expand(b, h, n, n))


def embed_kept(model: nn.Module, x: torch.Tensor, keep: torch.Tensor | None,
               masked: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Student input: embed all patches, then gather the prefix + kept tokens BEFORE any block (cost ∝ tokens);
    with ``keep`` None, the whole sequence (:func:`embed`).

    x: [B, 3, H, W], keep: [B, n] or None (all) -> ([B, P+n, D], rope of the kept patches or None).
    ``norm_pre`` is per token, so applying it after the gather gives the same values as before it.
    ``masked`` = (mask bool [B, N], token [1, 1, D]): the masked patches' embeddings are replaced by the token
    before the position embedding is added (SimMIM; mask feature reconstruction, paper Sec. 2.4).
    """
    if features_only(model):  # summary + the map on the student's grid
        x = model.tokens(x)
        return (x if keep is None else gather_tokens(x, keep, 1)), None
    x = model.patch_embed(x)
    if masked is not None:
        mask, token = masked
        w = mask.unsqueeze(-1).to(x.dtype)  # [B, N, 1]
        x = x * (1 - w) + token.to(x.dtype) * w
    p = num_prefix(model)
    if family(model) == "relpos":  # no position embedding: the class token, and the shared bias if there is one
        if model.cls_token is not None:
            x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        bias = model.shared_rel_pos.get_bias() if model.shared_rel_pos is not None else None
        if keep is not None:
            check_gathers_tokens(model, "the model")
            x = gather_tokens(x, keep, p)
            bias = None if bias is None else gather_bias(bias, keep, p)
        return x, bias
    if family(model) == "eva":
        x, rope = model._pos_embed(x)
        if keep is not None:
            x, rope = gather_tokens(x, keep, p), gather_rope(rope, keep)
        return model.norm_pre(x), rope
    x = model._pos_embed(x)  # [B, P+N, D]
    if keep is not None:
        x = gather_tokens(x, keep, p)  # [B, P+n, D]
    x = model.patch_drop(x)
    return model.norm_pre(x), None


def _attn_input(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x if type(block).__name__ in _POST_NORM_BLOCKS else block.norm1(x)


def _call(module: nn.Module, rope: torch.Tensor | None):
    """A block (or a RelPos block's attention) as a function of x, with its family's positional input (Eva:
    ``rope``, RelPos: ``shared_rel_pos``)."""
    if rope is None:
        return module
    rel = type(module).__name__ in (*_REL_POS_BLOCKS, "RelPosAttention")
    return partial(module, shared_rel_pos=rope) if rel else partial(module, rope=rope)


def _rotate(t: torch.Tensor, rope: torch.Tensor, prefix: int, half: bool) -> torch.Tensor:
    """RoPE on the patch tokens of t [B, H, T, dh] (the first ``prefix`` are not rotated), as timm's attention."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    return torch.cat([t[:, :, :prefix], apply_rot_embed_cat(t[:, :, prefix:], rope, half=half)], dim=2)


def relations(block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None, prefix: int = 0) -> torch.Tensor:
    """Token relations R = q·kᵀ of ``block`` (paper Eq. 2), without the 1/√d_h scale, exactly as its attention
    forms them: after its own q/k biases and q/k norms, with RoPE on the patch tokens.

    x: [B, T, D] hidden state entering the block (already restricted to the wanted tokens: the norm, projections
    and RoPE act per token, so R over a gathered sequence equals R over the full one, indexed); its first
    ``prefix`` tokens get no RoPE, ``rope`` belongs to the other T - prefix. Returns [B, H, T, T]. Only the q and
    k rows of a fused ``qkv`` weight are used.
    """
    attn = block.attn
    b, t, _ = x.shape
    h, dh = attn.num_heads, attn.head_dim
    a = _attn_input(block, x)  # [B, T, D]
    qkv = getattr(attn, "qkv", None)
    if qkv is not None:
        w = qkv.weight[: 2 * h * dh]  # [2·H·dh, D] q and k rows
        if qkv.bias is not None:
            bias = qkv.bias[: 2 * h * dh]
        elif getattr(attn, "q_bias", None) is not None:  # Eva: q bias + a zero k bias, outside the Linear
            bias = torch.cat([attn.q_bias, attn.k_bias])
        else:
            bias = None
        qk = F.linear(a, w, bias).reshape(b, t, 2, h, dh).permute(2, 0, 3, 1, 4)  # [2, B, H, T, dh]
        q, k = qk.unbind(0)  # [B, H, T, dh] each
    else:  # separate projections (EVA-02 CLIP; grouped k heads in some PE models)
        q = attn.q_proj(a).reshape(b, t, h, dh).transpose(1, 2)
        k = attn.k_proj(a).reshape(b, t, -1, dh).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None and type(block).__name__ not in _REL_POS_BLOCKS:  # a relative position bias is not in R
        half = bool(getattr(attn, "rotate_half", False))
        q, k = _rotate(q, rope, prefix, half), _rotate(k, rope, prefix, half)
    if k.shape[1] != h:  # grouped-query attention: head i uses k head i // (H / H_kv), as timm repeats them
        k = k.repeat_interleave(h // k.shape[1], dim=1)
    return q @ k.transpose(-2, -1)  # [B, H, T, T]


def attention_logits(block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None,
                     prefix: int = 0) -> torch.Tensor:
    """The logits the block's softmax sees over the tokens of x [B, T, D] (its whole sequence): q·kᵀ·scale
    (``relations``), plus the relative position bias of a RelPos block (its own, or the shared ``rope``).
    -> [B, H, T, T] (attention maps, head distance, NMI: paper Sec. 2.1)."""
    logits = relations(block, x, rope, prefix) * block.attn.scale
    if type(block).__name__ in _REL_POS_BLOCKS:
        own = getattr(block.attn, "rel_pos", None)
        bias = own.get_bias() if own is not None else rope
        if bias is not None:
            logits = logits + bias
    return logits


def msa(block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
    """Output of the block's attention branch after ``proj`` (and a post-norm block's norm1), before layer scale
    and the residual add. x: [B, T, D] hidden state entering the block (its full prefix) -> [B, T, D] (paper
    MSA_m^i; timm's fused attention)."""
    a = _attn_input(block, x)
    out = _call(block.attn, rope)(a)
    return block.norm1(out) if type(block).__name__ in _POST_NORM_BLOCKS else out


def run_blocks(
    model: nn.Module,
    x: torch.Tensor,
    rope: torch.Tensor | None = None,
    *,
    enter: Iterable[int] = (),
    leave: Iterable[int] = (),
    final: bool = False,
    checkpoint: bool = False,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor | None]:
    """Run ``model.blocks`` on x [B, T, D] (with the patches' ``rope``, Eva) only as far as needed; the taps.

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
        blk = _call(model.blocks[i], rope)
        if checkpoint:
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
        if i in leave:
            leaving[i] = x
    if stop in enter:
        entering[stop] = x
    return entering, leaving, (final_norm(model)(x) if final else None)


def final_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The final token features as distillation reads them: every token through every block and the final norm
    (:func:`final_norm`). x: [B, 3, H, W] -> [B, P+N, D]."""
    h, rope = embed(model, x)
    return run_blocks(model, h, rope, final=True)[2]


def final_norm(model: nn.Module) -> nn.Module:
    """The norm that ends a model's token features: ``norm``, or ``fc_norm`` where timm moved it there
    (``global_pool="avg"``: ``norm`` is Identity and the real final norm is ``fc_norm``)."""
    norm, fc = model.norm, getattr(model, "fc_norm", None)
    if isinstance(norm, nn.Identity) and fc is not None and not isinstance(fc, nn.Identity):
        return fc
    return norm


def pooled(model: nn.Module, last: torch.Tensor) -> torch.Tensor:
    """The model's own image summary, as its ``forward`` computes it without a classifier: ``norm``, then its
    pooling (attention pool (MAP), average or CLS) and ``fc_norm``. last: [B, P+N, D] leaving the last block -> [B, D']."""
    return model.forward_head(model.norm(last), pre_logits=True)


def pooled_width(model: nn.Module) -> int:
    """Width of :func:`pooled` (timm's ``head_hidden_size``, else ``num_features``)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def freeze(model: nn.Module, blocks: int = 0, patterns: Iterable[str] = ()) -> list[str]:
    """Freeze (``requires_grad_(False)``) the embeddings and the first ``blocks`` blocks (with ``blocks`` > 0), and
    every parameter whose name matches one of ``patterns`` (fnmatch, e.g. ``"blocks.1[01].*"``); the names frozen.
    HDError for a block count beyond the depth or a pattern that matches nothing."""
    from fnmatch import fnmatch

    if blocks > depth(model):
        raise HDError(f"freeze_blocks {blocks} is more than the student's {depth(model)} blocks",
                      f"freeze at most {depth(model)}")
    embeddings = ("patch_embed.", "cls_token", "reg_token", "pos_embed", "norm_pre.")
    frozen = []
    for name, p in model.named_parameters():
        block = name.startswith("blocks.") and int(name.split(".")[1]) < blocks
        if (blocks and (name.startswith(embeddings) or block)) or any(fnmatch(name, pat) for pat in patterns):
            p.requires_grad_(False)
            frozen.append(name)
    for pat in patterns:
        if not any(fnmatch(n, pat) for n in frozen):
            raise HDError(f"student.freeze pattern {pat!r} matches no parameter of the student",
                          f"parameter names look like {next(n for n, _ in model.named_parameters())}, blocks.0.attn.qkv.weight")
    return frozen
