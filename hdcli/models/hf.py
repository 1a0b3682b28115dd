"""The one place that knows Hugging Face Transformers' vision models (the optional extra ``hdcli[hf]``): a
``save_pretrained`` directory (or a hub snapshot of one) as a frozen teacher in timm's ViT layout
(:class:`hdcli.models.adapted.Adapted`), so features and relations (q·kᵀ exactly as its attention forms them)
come from the same code as for timm's teachers.

Families (Transformers 5.x; every one pre-norm, q_proj/k_proj in its attention):

| class | prefix tokens | position | final norm in ``last_hidden_state`` |
| --- | --- | --- | --- |
| ``ViTModel``, ``ViTMAEModel`` | CLS | absolute | ``layernorm`` |
| ``Dinov2Model``, ``Dinov2WithRegistersModel`` | CLS (+ registers after it) | absolute (on CLS + patches) | ``layernorm`` |
| ``DINOv3ViTModel`` | CLS + registers | RoPE on the patches (rotate-half) | ``norm`` |
| ``CLIPVisionModel`` | CLS | absolute, then ``pre_layrnorm`` | none (``post_layernorm`` is the pooled CLS's) |
| ``SiglipVisionModel`` (SigLIP, fixed-size SigLIP 2) | none (MAP head summary) | absolute | ``post_layernorm`` |

ViTMAE's own random masking is never used: the adapter embeds every patch in order (its ``mask_ratio`` is
irrelevant). The input mean/std come from the directory's ``preprocessor_config.json`` (``image_mean``,
``image_std``), never assumed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from hdcli.errors import HDError
from hdcli.models.adapted import Adapted, Attention, Block, PatchEmbed

PREPROCESSOR = "preprocessor_config.json"
EXTRA = "pip install 'hdcli[hf]' (Transformers 5.x)"
VISION_CLASSES = ("ViTModel", "ViTMAEModel", "Dinov2Model", "Dinov2WithRegistersModel", "DINOv3ViTModel",
                  "CLIPVisionModel", "SiglipVisionModel")
# a full model's config whose vision tower is used: model_type -> (vision config attribute, vision class)
TOWERS = {"clip": ("vision_config", "CLIPVisionModel"), "siglip": ("vision_config", "SiglipVisionModel")}
BY_MODEL_TYPE = {"vit": "ViTModel", "vit_mae": "ViTMAEModel", "dinov2": "Dinov2Model",
                 "dinov2_with_registers": "Dinov2WithRegistersModel", "dinov3_vit": "DINOv3ViTModel",
                 "clip_vision_model": "CLIPVisionModel", "siglip_vision_model": "SiglipVisionModel"}


def transformers():
    """The ``transformers`` module, or a one-line HDError naming the extra."""
    try:
        import transformers as t
    except ImportError:
        raise HDError("hf: teachers need Hugging Face Transformers, which is not installed", EXTRA) from None
    return t


def read_config(d: Path) -> dict:
    try:
        return json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise HDError(f"{d} holds no readable config.json ({e.__class__.__name__})",
                      "give a directory written by save_pretrained (config.json + model.safetensors)") from None


def vision_class(cfg: dict, where: Path) -> str:
    """The vision model class of a Transformers config (HDError for a text or other model)."""
    mt = cfg.get("model_type", "")
    if mt in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[mt]
    if mt in TOWERS:
        return TOWERS[mt][1]
    arch = (cfg.get("architectures") or ["?"])[0]
    raise HDError(f"{where} holds a Transformers {mt or arch} model, not a vision model hd can distil from",
                  f"give one of {', '.join(VISION_CLASSES)} (or a CLIP / SigLIP model, whose vision tower is used)")


def stats(d: Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) of the directory's image processor, or None when it has none."""
    try:
        p = json.loads((d / PREPROCESSOR).read_text())
        return tuple(float(v) for v in p["image_mean"]), tuple(float(v) for v in p["image_std"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load(d: Path, *, mean=None, std=None) -> Adapted:
    """A frozen, eval-mode teacher from a ``save_pretrained`` directory ``d``. ``mean``/``std``: its input
    statistics when the directory has no image processor config (HDError when neither gives them)."""
    t = transformers()
    cfg = read_config(d)
    cls_name = vision_class(cfg, d)
    found = stats(d)  # the model's own statistics win; mean/std only fill in where it states none
    if found is None and (mean is None or std is None):
        raise HDError(f"{d} has no {PREPROCESSOR} with image_mean/image_std, so its input normalisation is unknown",
                      "save the model's image processor beside it, or give hd distill --teacher-mean and --teacher-std")
    mean, std = found if found is not None else (mean, std)
    cls = getattr(t, cls_name)
    t.logging.set_verbosity_error()  # a CLIP / SigLIP model's text weights are not loaded: not news
    try:
        model = cls.from_pretrained(str(d))  # a CLIP / SigLIP model's directory gives its vision tower
    except (OSError, ValueError, RuntimeError) as e:
        raise HDError(f"cannot load the Transformers model in {d}: {str(e).splitlines()[0][:200]}",
                      "check that config.json and the weights belong together (save_pretrained writes both)") from None
    return adapt(model.eval().requires_grad_(False), mean, std)


def _core(model: nn.Module) -> nn.Module:
    """The module holding embeddings / encoder (a wrapper's ``vision_model`` where there is one)."""
    return getattr(model, "vision_model", model)


def _caller(rope: bool):
    """How a Transformers layer or attention is called on x (with its RoPE as (cos, sin)): its output tensor."""
    def call(module, x, pos):
        out = module(x, attention_mask=None, **({"position_embeddings": _cos_sin(pos)} if rope else {}))
        return out[0] if isinstance(out, tuple) else out

    return call


def _attention(layer: nn.Module, config, rope: bool) -> Attention:
    att = getattr(layer, "attention", None) or layer.self_attn
    heads = int(getattr(att, "num_heads", None) or config.num_attention_heads)
    return Attention(att, att.q_proj, att.k_proj, heads, int(att.head_dim), _caller(rope), rotate_half=rope)


def _cos_sin(rope: torch.Tensor | None):
    """hd's RoPE rows (timm's layout: sin then cos, [.., 2E]) -> Transformers' (cos, sin)."""
    if rope is None:
        return None
    sin, cos = rope.tensor_split(2, dim=-1)
    return cos, sin


def _blocks(layers, config, norm1: str, rope: bool) -> list[Block]:
    return [Block(layer, getattr(layer, norm1), _attention(layer, config, rope), _caller(rope)) for layer in layers]


def adapt(model: nn.Module, mean, std) -> Adapted:
    """A Transformers vision model (one of :data:`VISION_CLASSES`) in timm's ViT layout."""
    kind = type(model).__name__
    if kind not in VISION_CLASSES:
        raise HDError(f"Transformers' {kind} is not a vision model hd can read", f"use one of {', '.join(VISION_CLASSES)}")
    core, config = _core(model), model.config
    emb = core.embeddings
    size = config.image_size if isinstance(config.image_size, list | tuple) else (config.image_size,) * 2
    common = dict(mean=mean, std=std, embed_dim=config.hidden_size, kind=kind)
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    grid = [size[0] // patch, size[1] // patch]  # the current token grid (vit.fit_grid may change it)
    if kind == "DINOv3ViTModel":  # RoPE from the grid: nothing to resample
        regs = emb.register_tokens

        def pos_embed(x):
            b = x.shape[0]
            cos, sin = core.rope_embeddings(x.new_empty(1, 3, grid[0] * patch, grid[1] * patch))
            return torch.cat([emb.cls_token.expand(b, -1, -1), regs.expand(b, -1, -1), x], dim=1), \
                torch.cat([sin, cos], dim=-1)

        return Adapted(model, family="eva", patch_embed=PatchEmbed(emb.patch_embeddings, size), pos_embed=pos_embed,
                       blocks=_blocks(core.model.layer, config, "norm1", True), norm=core.norm, cls=True,
                       num_prefix=1 + regs.shape[1], resize=lambda g: grid.__setitem__(slice(None), g), **common)
    # absolute position embeddings [1, P+N, D] (P = 1 with a class token, 0 for SigLIP), resampled on request
    own = emb.position_embeddings if kind != "CLIPVisionModel" and kind != "SiglipVisionModel" else \
        emb.position_embedding.weight[None]
    prefix = 0 if kind == "SiglipVisionModel" else 1
    pos = {"table": own}

    def resize(g):
        from timm.layers import resample_abs_pos_embed

        pos["table"] = resample_abs_pos_embed(own.detach(), list(g), old_size=[size[0] // patch, size[1] // patch],
                                              num_prefix_tokens=prefix)
        grid[:] = g

    def table(x):
        return pos["table"].to(device=x.device, dtype=x.dtype)

    regs = getattr(emb, "register_tokens", None)
    if kind in ("ViTModel", "ViTMAEModel"):
        def pos_embed(x):
            p = table(x)
            cls = (emb.cls_token + p[:, :1]).expand(x.shape[0], -1, -1)
            return torch.cat([cls, x + p[:, 1:]], dim=1)

        layers = getattr(core, "layers", None) or core.encoder.layer
        return Adapted(model, family="vit", patch_embed=PatchEmbed(emb.patch_embeddings.projection, size),
                       pos_embed=pos_embed, blocks=_blocks(layers, config, "layernorm_before", False),
                       norm=core.layernorm, cls=True, num_prefix=1, resize=resize, **common)
    if kind in ("Dinov2Model", "Dinov2WithRegistersModel"):
        def pos_embed(x):
            x = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + table(x)
            if regs is None:
                return x
            return torch.cat([x[:, :1], regs.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)

        return Adapted(model, family="vit", patch_embed=PatchEmbed(emb.patch_embeddings.projection, size),
                       pos_embed=pos_embed, blocks=_blocks(core.encoder.layer, config, "norm1", False),
                       norm=core.layernorm, cls=True, num_prefix=1 + (0 if regs is None else regs.shape[1]),
                       resize=resize, **common)
    if kind == "CLIPVisionModel":
        def pos_embed(x):
            cls = emb.class_embedding.expand(x.shape[0], 1, -1)
            return torch.cat([cls, x], dim=1) + table(x)

        return Adapted(model, family="vit", patch_embed=PatchEmbed(emb.patch_embedding, size), pos_embed=pos_embed,
                       blocks=_blocks(core.encoder.layers, config, "layer_norm1", False), norm=nn.Identity(),
                       norm_pre=core.pre_layrnorm, cls=True, num_prefix=1, resize=resize, **common)
    # SiglipVisionModel: no class token; its MAP head is the summary
    head = getattr(core, "head", None) if getattr(core, "use_head", True) else None

    def pos_embed(x):
        return x + table(x)

    return Adapted(model, family="vit", patch_embed=PatchEmbed(emb.patch_embedding, size), pos_embed=pos_embed,
                   blocks=_blocks(core.encoder.layers, config, "layer_norm1", False), norm=core.post_layernorm,
                   cls=False, num_prefix=0, pool=head if head is not None else (lambda x: x.mean(dim=1)),
                   resize=resize, **common)
