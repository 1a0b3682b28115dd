"""Features-only teachers: any model that gives a spatial map [B, C, h, w] or tokens [B, T, D] (a timm model that
is not a ViT, e.g. ConvNeXt or SAM's windowed ``samvit_*``; a lab's own ``nn.Module`` via ``py:module:callable``).

Such a teacher is read as one summary token followed by the student's grid of patch tokens, so the method takes
its features exactly as a ViT's ``features`` target (CLS + kept patches):

- the map is resampled to the student's token grid by **bilinear** interpolation (``align_corners=False``, as
  AM-RADIO and Theia resample teacher maps; antialiased when it shrinks), then flattened row-major;
- the summary is the model's own pooled output where it has one (timm's ``forward_head(pre_logits=True)``), else
  the spatial mean of the map (a token sequence with 1 + h·w tokens gives its first token);
- it has no blocks, so it can be neither a relation teacher nor the mask teacher (one-line errors say so).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hdcli.errors import HDError


def resample(feature_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, C, h, w] -> [B, rows·cols, C]: bilinear (antialiased when shrinking) to ``grid``, row-major."""
    if tuple(feature_map.shape[-2:]) != tuple(grid):
        shrink = feature_map.shape[-2] > grid[0] or feature_map.shape[-1] > grid[1]
        feature_map = F.interpolate(feature_map, size=grid, mode="bilinear", align_corners=False, antialias=shrink)
    return feature_map.flatten(2).transpose(1, 2)


def as_map(y: torch.Tensor, who: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A teacher's output as (map [B, C, h, w], its own summary [B, C] or None). Tokens [B, T, D]: T = h·w square,
    or 1 + h·w (the first token is the summary). HDError for any other shape."""
    if not isinstance(y, torch.Tensor):
        raise HDError(f"{who} returned a {type(y).__name__}, not a tensor",
                      "a features-only teacher's forward returns a map [B, C, h, w] or tokens [B, T, D]")
    if y.dim() == 4:
        return y, None
    if y.dim() == 3:
        t = y.shape[1]
        for first in (0, 1):
            side = math.isqrt(t - first)
            if side * side == t - first and side > 0:
                grid = y[:, first:].transpose(1, 2).reshape(y.shape[0], y.shape[2], side, side)
                return grid, (y[:, 0] if first else None)
    raise HDError(f"{who} returned a tensor of shape {tuple(y.shape)}",
                  "a features-only teacher returns a map [B, C, h, w] or tokens [B, T, D] with T = h·w or 1 + h·w")


class Features(nn.Module):
    """A features-only teacher in the form :mod:`hdcli.models.vit` reads (``hd_family = "features"``): no blocks,
    ``tokens(images)`` = [B, 1 + rows·cols, C] (summary, then the map resampled to ``grid``), ``embed_dim`` = C.

    ``body``: the module (its parameters set the input dtype); ``run(images)`` -> map or tokens; ``summary(map)``:
    the model's own pooled output, or None (then the mean of the map); ``img_size``: the input size it takes.
    """

    hd_family = "features"

    def __init__(self, body: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], *, img_size: int, mean, std,
                 kind: str, summary: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.body, self._run, self._summary = body, run, summary
        self.hd_kind = kind
        self.img_size = (int(img_size),) * 2
        self.grid: tuple[int, int] | None = None
        self.blocks = nn.ModuleList()
        self.norm = nn.Identity()
        self.cls_token = True  # the summary takes the student's CLS (vit.prefix_roles)
        self.num_prefix_tokens = 1
        self.pretrained_cfg = {"mean": tuple(mean), "std": tuple(std), "tag": kind}
        param = next(iter(body.parameters()), torch.empty(0))
        if param.is_meta:  # an architecture only (a run from a target cache): timm's own count
            width = int(body.num_features)
        else:
            with torch.no_grad():  # the width, from one probe image
                probe, _ = as_map(self._run(torch.zeros(1, 3, *self.img_size, dtype=param.dtype, device=param.device)),
                                  f"teacher {kind}")
            width = int(probe.shape[1])
        self.embed_dim = self.num_features = self.head_hidden_size = width

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 1 + rows·cols, C]: the summary, then the map on the student's grid."""
        if self.grid is None:
            raise HDError(f"the features-only teacher {self.hd_kind} has no token grid yet", "vit.fit_grid sets it")
        feature_map, first = as_map(self._run(images), f"teacher {self.hd_kind}")
        if self._summary is not None:
            summary = self._summary(feature_map)
        else:
            summary = first if first is not None else feature_map.mean(dim=(2, 3))
        return torch.cat([summary[:, None].to(feature_map.dtype), resample(feature_map, self.grid)], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x[:, 0]


def from_timm(model: nn.Module, *, mean, std, img_size: int | None = None) -> Features:
    """A timm model that is not a ViT (ConvNeXt, ``samvit_*``, ...): ``forward_features`` gives the map, its
    ``forward_head(pre_logits=True)`` the summary."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)  # a fixed input size it was built for
    size = img_size or (int(built[-1]) if built else int((cfg.get("input_size") or (3, 224, 224))[-1]))
    return Features(model, model.forward_features, img_size=size, mean=mean, std=std,
                    kind=type(model).__name__, summary=lambda m: model.forward_head(m, pre_logits=True))


def from_callable(obj, *, name: str, mean=None, std=None, img_size: int | None = None) -> Features:
    """What a ``py:module:callable`` teacher's callable returned: an ``nn.Module`` whose forward gives a map or tokens.
    Its input statistics come from its ``mean``/``std`` (or ``pretrained_cfg``) attributes, else ``mean``/``std``
    given here (``--teacher-mean/--teacher-std``); never assumed."""
    if not isinstance(obj, nn.Module):
        raise HDError(f"teacher {name} returned a {type(obj).__name__}, not a torch.nn.Module",
                      "return the model (an nn.Module whose forward gives [B, C, h, w] or [B, T, D])")
    cfg = getattr(obj, "pretrained_cfg", None) or {}
    own_mean, own_std = getattr(obj, "mean", None) or cfg.get("mean"), getattr(obj, "std", None) or cfg.get("std")
    mean, std = (own_mean, own_std) if own_mean is not None and own_std is not None else (mean, std)
    if mean is None or std is None:
        raise HDError(f"teacher {name} does not say how its inputs are normalised",
                      "give the module mean/std attributes (or pretrained_cfg), or pass --teacher-mean and --teacher-std")
    size = img_size or getattr(obj, "img_size", None) or int((cfg.get("input_size") or (3, 224, 224))[-1])
    return Features(obj.eval().requires_grad_(False), obj, img_size=int(size), mean=mean, std=std, kind=name)


def as_teacher(model: nn.Module, *, img_size: int | None = None) -> nn.Module:
    """A timm model of another family than the ViTs (ConvNeXt, ``samvit_*``, ...) as a features-only teacher, with its
    own input statistics (``pretrained_cfg``); a model of a supported family as it is."""
    from hdcli.models import vit

    if vit.family(model):
        return model
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        raise HDError(f"the {type(model).__name__} teacher's pretrained_cfg has no mean/std",
                      "pass --teacher-mean and --teacher-std")
    return from_timm(model, mean=mean, std=std, img_size=img_size)
