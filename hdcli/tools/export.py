"""Export a distilled student for downstream work: timm, detectron2 (ViTDet) and mmsegmentation (MAE).

Three layers, top to bottom:
- pure functions on timm state dicts: ``pos_embed_with_cls_slot`` and ``to_detectron2`` /
  ``to_mmseg`` (key renaming, CLS slot of the position embedding, zero/one fills);
- ``layout(model)``: what those functions need to know about a timm ViT, and the checks that the
  model is the plain pre-norm ViT both targets implement (anything else is an ``HDError``);
- loading a student (run dir, ``student/`` dir, ``local-dir:``, or a teacher name / timm tag) and
  writing the files (``export``).

Target names, from those projects' sources:
- detectron2 ``modeling/backbone/vit.py``: ``ViT`` has ``patch_embed.proj`` (Conv2d), ``pos_embed``
  [1, 1+N, D] when ``pretrain_use_cls_token=True`` (``get_abs_pos`` drops the CLS slot and resizes
  the rest), ``blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, no CLS token and
  no final norm; the ViTDet configs wrap it as ``SimpleFeaturePyramid(net=ViT)`` inside
  ``model.backbone``, hence ``backbone.net.*``. ``rel_pos_h/w`` are zero-initialised there.
- mmsegmentation ``backbones/mae.py`` (on ``beit.py``): ``cls_token``, ``pos_embed`` [1, 1+N, D]
  (resized at load by ``resize_abs_pos_embed``), ``patch_embed.projection``,
  ``layers.i.{ln1, attn.qkv (bias=True), attn.proj, ln2, ffn.layers.0.0, ffn.layers.1, gamma_1,
  gamma_2}``; ``relative_position_bias_table`` is zero-initialised for MAE. The renaming is the one
  ``tools/model_converters/beit2mmseg.py`` applies (blocks→layers, norm→ln, mlp.fc1→ffn.layers.0.0,
  mlp.fc2→ffn.layers.1, patch_embed.proj→patch_embed.projection).

torch and timm are imported at module top: the command imports this module inside its function.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from hdcli.errors import HDError
from hdcli.rundir import reason, replacing

FORMATS = ("timm", "detectron2", "mmseg")

# timm block suffix -> target block suffix. Biases missing in timm (qkv_bias=False, ...) are written
# as zeros, which is what a layer without bias computes; mmseg's gammas default to ones (no layer scale).
D2_BLOCK = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.qkv.bias": "attn.qkv.bias",
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
MMSEG_BLOCK = {
    "norm1.weight": "ln1.weight",
    "norm1.bias": "ln1.bias",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.qkv.bias": "attn.qkv.bias",
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
    "norm2.weight": "ln2.weight",
    "norm2.bias": "ln2.bias",
    "mlp.fc1.weight": "ffn.layers.0.0.weight",
    "mlp.fc1.bias": "ffn.layers.0.0.bias",
    "mlp.fc2.weight": "ffn.layers.1.weight",
    "mlp.fc2.bias": "ffn.layers.1.bias",
    "ls1.gamma": "gamma_1",
    "ls2.gamma": "gamma_2",
}
D2_PREFIX = "backbone.net."
# Parts of a timm ViT that the backbones have no use for: the classifier side (final norm, pooling,
# head) and, for ViTDet, the CLS token (it runs on patch tokens only).
_HEAD_KEYS = ("norm.", "fc_norm.", "head.", "attn_pool.")


@dataclass(frozen=True)
class Layout:
    """What the converters need to know about a timm ViT beyond its state dict."""

    depth: int
    embed_dim: int
    num_heads: int
    patch_size: int
    grid: tuple[int, int]
    has_cls: bool
    reg_tokens: int
    pos_prefix: int  # leading pos_embed rows that belong to prefix tokens (0 with no_embed_class)
    mlp_ratio: float
    norm_eps: float

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def img_size(self) -> int:
        return self.grid[0] * self.patch_size


@dataclass
class Converted:
    state_dict: dict[str, Tensor]
    notes: list[str] = field(default_factory=list)  # what was dropped or filled, for the user


# ---------------------------------------------------------------------------------------------
# Pure functions on state dicts
# ---------------------------------------------------------------------------------------------


def pos_embed_with_cls_slot(pos_embed: Tensor | None, lay: Layout) -> Tensor:
    """timm's position embedding in the layout both targets load: [1, 1 + N, D], CLS slot first.

    timm keeps ``pos_prefix`` leading rows for its prefix tokens (CLS, then registers) unless
    ``no_embed_class`` is set, in which case it has none (the CLS token carries no position).
    The CLS row is kept where timm has one; otherwise it is zero, which is what timm adds to its
    CLS token. Register rows are dropped. A model without position embedding gets zeros.
    """
    n, d = lay.num_patches, lay.embed_dim
    if pos_embed is None:
        return torch.zeros(1, 1 + n, d)
    if pos_embed.shape[-2] != lay.pos_prefix + n:
        raise HDError(
            f"position embedding has {pos_embed.shape[-2]} rows, expected {lay.pos_prefix} prefix + {n} patches",
            "the weights do not match the model's config.json",
        )
    patches = pos_embed[:, lay.pos_prefix:]  # [1, N, D]
    if lay.has_cls and lay.pos_prefix > 0:
        cls = pos_embed[:, :1]  # [1, 1, D], CLS is timm's first prefix token
    else:
        cls = torch.zeros_like(patches[:, :1])
    return torch.cat([cls, patches], dim=1)  # [1, 1 + N, D]


def _split(sd: dict[str, Tensor], lay: Layout) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """Top-level tensors and one dict of suffix -> tensor per block."""
    top: dict[str, Tensor] = {}
    blocks: list[dict[str, Tensor]] = [{} for _ in range(lay.depth)]
    for key, value in sd.items():
        parts = key.split(".", 2)
        if parts[0] == "blocks" and len(parts) == 3 and parts[1].isdigit() and int(parts[1]) < lay.depth:
            blocks[int(parts[1])][parts[2]] = value
        else:
            top[key] = value
    return top, blocks


def _convert_blocks(
    blocks: list[dict[str, Tensor]], table: dict[str, str], prefix: str, lay: Layout, fmt: str
) -> tuple[dict[str, Tensor], set[str]]:
    """Rename every block's tensors by ``table``; fill missing biases with zeros, gammas with ones.
    Returns the tensors and the set of unknown block suffixes."""
    out: dict[str, Tensor] = {}
    unknown: set[str] = set()
    for i, blk in enumerate(blocks):
        unknown |= set(blk) - set(table)
        for src, dst in table.items():
            if src in blk:
                value = blk[src]
            elif src.endswith(".bias") and src.replace(".bias", ".weight") in blk:
                value = torch.zeros(blk[src.replace(".bias", ".weight")].shape[0])
            elif src.endswith(".gamma"):  # mmseg: a block without layer scale multiplies by one
                value = torch.ones(lay.embed_dim)
            else:
                raise HDError(f"block {i} has no {src!r}", f"not a plain timm ViT; {fmt} needs one")
            out[f"{prefix}{i}.{dst}"] = value
    return out, unknown


def _reject_unknown(unknown: set[str], fmt: str) -> None:
    if unknown:
        names = ", ".join(sorted(unknown)[:6]) + (", ..." if len(unknown) > 6 else "")
        raise HDError(
            f"the student has parts that {fmt}'s plain-ViT backbone has no place for: {names}",
            "export --format timm keeps every weight",
        )


def _patch_embed(top: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    if "patch_embed.proj.weight" not in top:
        raise HDError("the student has no patch_embed.proj.weight", "not a timm ViT")
    w = top.pop("patch_embed.proj.weight")  # [D, 3, p, p]
    b = top.pop("patch_embed.proj.bias", torch.zeros(w.shape[0]))
    return w, b


def to_detectron2(sd: dict[str, Tensor], lay: Layout) -> Converted:
    """timm ViT state dict -> the keys of detectron2's ViTDet backbone (``backbone.net.*``).

    Kept: patch embedding, position embedding with its CLS slot ([1, 1+N, D], as ViTDet's
    ``pretrain_use_cls_token=True`` expects), every block. Dropped: CLS/register tokens, final
    norm, pooling and head (ViTDet uses none of them).
    """
    top, blocks = _split(dict(sd), lay)
    notes = []
    w, b = _patch_embed(top)
    out = {
        f"{D2_PREFIX}pos_embed": pos_embed_with_cls_slot(top.pop("pos_embed", None), lay),
        f"{D2_PREFIX}patch_embed.proj.weight": w,
        f"{D2_PREFIX}patch_embed.proj.bias": b,
    }
    block_sd, unknown = _convert_blocks(blocks, D2_BLOCK, f"{D2_PREFIX}blocks.", lay, "detectron2")
    out.update(block_sd)
    for key in ("cls_token", "reg_token"):
        if top.pop(key, None) is not None:
            notes.append(f"dropped {key} (ViTDet runs on patch tokens only)")
    unknown |= {k for k in top if not k.startswith(_HEAD_KEYS)}
    _reject_unknown(unknown, "detectron2")
    if any(k.startswith(_HEAD_KEYS) for k in top):
        notes.append("dropped final norm / pooling / head (" + ", ".join(sorted({k.split(".")[0] for k in top})) + ")")
    return Converted(out, notes)


def to_mmseg(sd: dict[str, Tensor], lay: Layout) -> Converted:
    """timm ViT state dict -> the keys of mmsegmentation's ``MAE`` backbone (beit2mmseg naming).

    Kept: CLS token, position embedding [1, 1+N, D], patch embedding, every block, layer scale as
    ``gamma_1/gamma_2`` (ones where timm has none, so the config's ``init_values`` never matters).
    Dropped: final norm, pooling and head (the MAE backbone runs with ``final_norm=False``).
    """
    if not lay.has_cls:
        raise HDError("the student has no CLS token; mmseg's MAE backbone always prepends one",
                      "use --format detectron2 or timm")
    if lay.reg_tokens:
        raise HDError(f"the student has {lay.reg_tokens} register tokens; mmseg's MAE backbone has none",
                      "use --format detectron2 or timm")
    top, blocks = _split(dict(sd), lay)
    notes = []
    w, b = _patch_embed(top)
    out = {
        "cls_token": top.pop("cls_token"),
        "pos_embed": pos_embed_with_cls_slot(top.pop("pos_embed", None), lay),
        "patch_embed.projection.weight": w,
        "patch_embed.projection.bias": b,
    }
    block_sd, unknown = _convert_blocks(blocks, MMSEG_BLOCK, "layers.", lay, "mmseg")
    out.update(block_sd)
    unknown |= {k for k in top if not k.startswith(_HEAD_KEYS)}
    _reject_unknown(unknown, "mmseg")
    if top:
        notes.append("dropped final norm / pooling / head (" + ", ".join(sorted({k.split(".")[0] for k in top})) + ")")
    return Converted(out, notes)


CONVERTERS = {"detectron2": to_detectron2, "mmseg": to_mmseg}


# ---------------------------------------------------------------------------------------------
# The model: layout and plain-ViT checks
# ---------------------------------------------------------------------------------------------


def layout(model: nn.Module, fmt: str = "detectron2") -> Layout:
    """Read the layout of a timm ViT and check that it is the plain pre-norm ViT that ViTDet and
    mmseg's MAE implement (timm ``Block`` + ``Attention`` + ``Mlp`` with exact GELU, LayerNorm,
    square patches and grid). Parts with weights are also checked key by key in the converters."""
    from timm.layers import Mlp
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    def bad(what: str) -> HDError:
        return HDError(f"{what}; {fmt}'s backbone is a plain pre-norm ViT", "export --format timm keeps it as is")

    if not isinstance(model, VisionTransformer):
        what = " with RoPE" if getattr(model, "rope", None) is not None else ""
        raise bad(f"the student is a {type(model).__name__}{what}, not a timm VisionTransformer with absolute "
                  "position embeddings")
    if not isinstance(model.norm_pre, nn.Identity):
        raise bad("the student has a pre-norm before its blocks (norm_pre)")
    if not isinstance(model.patch_embed.norm, nn.Identity):
        raise bad("the student normalises its patch embedding")
    b0 = model.blocks[0]
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention or type(blk.mlp) is not Mlp:
            raise bad(f"block {i} is {type(blk).__name__}({type(blk.attn).__name__}, {type(blk.mlp).__name__})")
        if not (type(blk.mlp.act) is nn.GELU and blk.mlp.act.approximate == "none"):
            raise bad(f"block {i} uses activation {blk.mlp.act!r}, not exact GELU")
        if not (isinstance(blk.norm1, nn.LayerNorm) and isinstance(blk.norm2, nn.LayerNorm)):
            raise bad(f"block {i} normalises with {type(blk.norm1).__name__}, not LayerNorm")
        if blk.attn.attn_dim != model.embed_dim:
            raise bad(f"block {i} attends in width {blk.attn.attn_dim} != embed dim {model.embed_dim}")
    p = tuple(model.patch_embed.patch_size)
    grid = tuple(model.patch_embed.grid_size)
    if p[0] != p[1] or grid[0] != grid[1]:
        raise bad(f"patches {p} / token grid {grid} are not square")
    return Layout(
        depth=len(model.blocks),
        embed_dim=model.embed_dim,
        num_heads=b0.attn.num_heads,
        patch_size=p[0],
        grid=grid,
        has_cls=model.cls_token is not None,
        reg_tokens=0 if model.reg_token is None else model.reg_token.shape[1],
        pos_prefix=0 if model.no_embed_class else model.num_prefix_tokens,
        mlp_ratio=b0.mlp.fc1.out_features / model.embed_dim,
        norm_eps=b0.norm1.eps,
    )


def config_overrides(lay: Layout, fmt: str) -> list[str]:
    """Config settings that make the target build this student's shape (only those that differ
    from the ViT-B/16 configs named in docs/downstream.md)."""
    if fmt == "detectron2":
        k = "model.backbone.net."
        want = {f"{k}patch_size": lay.patch_size, f"{k}embed_dim": lay.embed_dim, f"{k}depth": lay.depth,
                f"{k}num_heads": lay.num_heads, f"{k}mlp_ratio": lay.mlp_ratio,
                f"{k}pretrain_img_size": lay.img_size}
        base = {f"{k}patch_size": 16, f"{k}embed_dim": 768, f"{k}depth": 12, f"{k}num_heads": 12,
                f"{k}mlp_ratio": 4.0, f"{k}pretrain_img_size": 224}
    elif fmt == "mmseg":
        k = "model.backbone."
        want = {f"{k}patch_size": lay.patch_size, f"{k}embed_dims": lay.embed_dim, f"{k}num_layers": lay.depth,
                f"{k}num_heads": lay.num_heads, f"{k}mlp_ratio": lay.mlp_ratio}
        base = {f"{k}patch_size": 16, f"{k}embed_dims": 768, f"{k}num_layers": 12, f"{k}num_heads": 12,
                f"{k}mlp_ratio": 4.0}
    else:
        return []
    return [f"{key}={_fmt_value(v)}" for key, v in want.items() if v != base[key]]


def _fmt_value(v) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


# ---------------------------------------------------------------------------------------------
# Loading a student, writing files
# ---------------------------------------------------------------------------------------------


def check_out(out: Path, fmt: str, *, force: bool) -> None:
    """Validate the output path before any work is done."""
    if fmt == "detectron2" and out.suffix in (".pkl", ".pyth"):
        raise HDError(f"detectron2 reads {out.suffix} files as another format", "name the file *.pth")
    if fmt != "timm" and out.is_dir():
        raise HDError(f"{out} is a directory", f"--format {fmt} writes one .pth file")
    if fmt == "timm" and out.exists() and not out.is_dir():
        raise HDError(f"{out} is a file", "--format timm writes a directory (config.json + model.safetensors)")
    if out.exists() and not force and (out.is_file() or any(out.iterdir())):
        raise HDError(f"{out} already exists", "pass --force to overwrite it")


@dataclass
class ExportResult:
    path: Path
    fmt: str
    tensors: int
    params: int
    notes: list[str]
    overrides: list[str]


def export(model: nn.Module, fmt: str, out: str | Path, *, force: bool = False) -> ExportResult:
    """Write ``model`` as ``fmt`` to ``out``: a directory for timm, one ``.pth`` file otherwise."""
    out = Path(out)
    if fmt not in FORMATS:
        from hdcli.errors import did_you_mean

        raise HDError(f"unknown format {fmt!r}", did_you_mean(fmt, FORMATS))
    check_out(out, fmt, force=force)
    if fmt == "timm":
        _write_timm(model, out)
        sd = model.state_dict()
        return ExportResult(out, fmt, len(sd), sum(v.numel() for v in sd.values()), [], [])
    lay = layout(model, fmt)
    conv = CONVERTERS[fmt](model.state_dict(), lay)
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in conv.state_dict.items()}
    if lay.norm_eps != 1e-6:
        conv.notes.append(f"the student's LayerNorm eps is {lay.norm_eps:g}; the configs use 1e-6: set it to match")
    out.parent.mkdir(parents=True, exist_ok=True)
    # detectron2's DetectionCheckpointer reads {"model": state_dict}; mmseg's backbones read a flat
    # state dict (what beit2mmseg.py writes) or {"state_dict": ...}.
    payload = {"model": sd, "__author__": "hd export"} if fmt == "detectron2" else sd
    try:
        with replacing(out) as tmp:  # a failed save (a full disk) leaves neither a partial file nor a temp one
            torch.save(payload, tmp)
    except (OSError, RuntimeError) as e:
        raise HDError(f"could not write {out}: {reason(e)}", "check free space and permissions; nothing was "
                      "written" + ("" if not out.exists() else f" ({out} is the previous export)")) from None
    params = sum(v.numel() for v in sd.values())
    return ExportResult(out, fmt, len(sd), params, conv.notes, config_overrides(lay, fmt))


def _write_timm(model: nn.Module, out: Path) -> None:
    """``save_for_hf`` into a temp dir beside ``out``, then its files moved into ``out`` one rename each
    (``--force`` replaces config.json and model.safetensors; nothing else in ``out`` is touched). A failed
    write (a full disk) leaves ``out`` as it was, and no empty ``out`` where there was none."""
    import shutil

    from timm.models import save_for_hf

    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    created = not out.exists()
    try:
        tmp.mkdir(parents=True)
        save_for_hf(model, str(tmp), safe_serialization=True)
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    except Exception as e:  # OSError, SafetensorError (a full disk reaches safetensors as its own error)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise HDError(f"could not write {out}: {reason(e)}", "check free space and permissions; "
                      + (f"{out} keeps the previous export" if out.exists() else "nothing was written")) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def num_params_str(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


__all__ = [
    "FORMATS", "Layout", "Converted", "ExportResult", "pos_embed_with_cls_slot", "to_detectron2",
    "to_mmseg", "layout", "config_overrides", "export",
]
