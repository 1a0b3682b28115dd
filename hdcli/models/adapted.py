"""Models of other libraries in timm's ViT layout, so that everything in :mod:`hdcli.models.vit` (embedding, kept
tokens, blocks, q·kᵀ, final norm) reads them as it reads timm's: the pieces here hold the other library's own
modules and call them; only :mod:`hdcli.models.hf` (Transformers) and :mod:`hdcli.models.features`
(features-only teachers) know which of those modules is which.

An adapted model has timm's ``VisionTransformer`` attributes: ``patch_embed`` (``proj``, ``img_size``,
``patch_size``, ``grid_size``; [B, 3, H, W] -> [B, N, D]), ``_pos_embed`` (prefix tokens and position embedding:
[B, N, D] -> [B, P+N, D], or (tokens, RoPE) for a RoPE model), ``norm_pre``, ``patch_drop``, ``blocks`` (pre-norm:
``norm1`` and an ``attn`` exposing ``q_proj``/``k_proj``, ``num_heads``, ``head_dim``, ``scale``), ``norm``,
``cls_token`` (None without one), ``num_prefix_tokens``, ``embed_dim``, ``pretrained_cfg`` (mean, std), and
``hd_family``: ``"vit"`` (absolute position embeddings) or ``"eva"`` (RoPE from ``_pos_embed``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """A patch projection (a Conv2d of stride = kernel = patch) as timm's ``PatchEmbed``: [B, 3, H, W] -> [B, N, D]."""

    def __init__(self, proj: nn.Conv2d, img_size: tuple[int, int]):
        super().__init__()
        self.proj = proj
        self.patch_size = tuple(int(p) for p in proj.kernel_size)
        self.img_size = tuple(int(s) for s in img_size)
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size, strict=True))
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """A library's self-attention seen as timm's: ``q_proj``/``k_proj`` (``vit.relations`` reads q·kᵀ from them),
    ``num_heads``, ``head_dim``, ``scale``, and its forward (the attention branch up to its output projection)."""

    def __init__(self, module: nn.Module, q_proj: nn.Linear, k_proj: nn.Linear, num_heads: int, head_dim: int,
                 call: Callable[..., torch.Tensor], rotate_half: bool = False):
        super().__init__()
        self.module, self.q_proj, self.k_proj = module, q_proj, k_proj
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.num_heads, self.head_dim, self.scale = int(num_heads), int(head_dim), float(head_dim) ** -0.5
        self.rotate_half = rotate_half  # RoPE as timm's apply_rot_embed_cat(half=True) computes it
        self._call = call

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        return self._call(self.module, x, rope)


class Block(nn.Module):
    """A library's pre-norm transformer layer as timm's ``Block``: ``norm1`` (its attention's input norm), ``attn``
    (:class:`Attention`), and its forward (x [, rope] -> x)."""

    def __init__(self, layer: nn.Module, norm1: nn.Module, attn: Attention,
                 call: Callable[..., torch.Tensor]):
        super().__init__()
        self.layer, self.norm1, self.attn = layer, norm1, attn
        self._call = call

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        return self._call(self.layer, x, rope)


class Adapted(nn.Module):
    """A whole model in timm's ViT layout (the module docstring). ``source``: the library's model (kept, so its
    weights are this module's); ``pos_embed``: [B, N, D] patch tokens -> [B, P+N, D] (and the RoPE [N, E] of the
    patches when ``family`` is ``"eva"``); ``pool``: the model's own summary of its final tokens (for a teacher
    without CLS, ``vit.pooled``), or None."""

    def __init__(self, source: nn.Module, *, family: str, patch_embed: PatchEmbed, pos_embed: Callable,
                 blocks: list[Block], norm: nn.Module, norm_pre: nn.Module | None = None, cls: bool,
                 num_prefix: int, embed_dim: int, mean, std, pool: Callable | None = None, kind: str = "",
                 resize: Callable[[tuple[int, int]], None] | None = None):
        super().__init__()
        self.source = source
        self.hd_family, self.hd_kind = family, kind or type(source).__name__
        self.patch_embed = patch_embed
        self._pos = pos_embed
        self.norm_pre = norm_pre if norm_pre is not None else nn.Identity()
        self.patch_drop = nn.Identity()
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.cls_token = True if cls else None  # vit.has_cls reads its presence
        self.num_prefix_tokens = int(num_prefix)
        self.embed_dim = self.num_features = self.head_hidden_size = int(embed_dim)
        self.pretrained_cfg = {"mean": tuple(mean), "std": tuple(std), "tag": self.hd_kind}
        self._pool = pool
        self._resize = resize  # grid -> None: the position embeddings resampled to it (None: fixed size)
        self.global_pool = "map" if pool is not None else "token"  # a summary without CLS (targets.match_prefix)

    def _pos_embed(self, x: torch.Tensor):
        return self._pos(x)

    def set_input_size(self, img_size) -> None:
        """Take ``img_size`` inputs (``vit.fit_grid``: the student's token grid): the position embeddings resampled
        to the new grid as timm resamples its own (bicubic, ``resample_abs_pos_embed``)."""
        from hdcli.errors import HDError

        size = tuple(int(s) for s in img_size)
        pe = self.patch_embed
        if self._resize is None or any(s % p for s, p in zip(size, pe.patch_size, strict=True)):
            raise HDError(f"the {self.hd_kind} teacher takes {pe.img_size[0]} px images (a {pe.grid_size[0]}x"
                          f"{pe.grid_size[1]} grid) and cannot take {size[0]}x{size[1]} px",
                          "give the student the teacher's token grid (--img-size / --patch-size)")
        grid = (size[0] // pe.patch_size[0], size[1] // pe.patch_size[1])
        self._resize(grid)
        pe.img_size, pe.grid_size, pe.num_patches = size, grid, grid[0] * grid[1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        from hdcli.models import vit

        return vit.final_features(self, x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The summary: the model's own pooling of its normed final tokens, or its CLS token."""
        return self._pool(x) if self._pool is not None else x[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
